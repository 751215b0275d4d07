#!/bin/bash
# A file-backed disk written against nbdkit's sh-plugin convention, used by
# tests/plugins.rs.  Run as: nbdkit-rs sh tests/data/file-disk.sh file=DISK
# It keeps the file name in $tmpdir (scripts are stateless between calls).

f="$tmpdir/file"

case "$1" in
    config)
        if [ "$2" = file ]; then
            ln -sf "$(realpath "$3")" "$f"
        else
            echo "unknown parameter $2=$3" >&2
            exit 1
        fi
        ;;
    config_complete)
        if [ ! -L "$f" ]; then
            echo "file parameter missing" >&2
            exit 1
        fi
        ;;
    thread_model)
        echo parallel ;;
    open)
        # The handle is a per-connection directory.
        mktemp -d "$tmpdir/handle-XXXXXX" ;;
    close)
        rm -rf "$2" ;;
    get_size)
        stat -L -c '%s' "$f" ;;
    pread)
        dd if="$f" skip="$4" count="$3" iflag=count_bytes,skip_bytes status=none ;;
    pwrite)
        case "$5" in
            *fua*) sync=conv=notrunc,fsync ;;
            *) sync=conv=notrunc ;;
        esac
        dd of="$f" seek="$4" "$sync" oflag=seek_bytes status=none ;;
    can_write) exit 0 ;;
    can_flush) exit 0 ;;
    flush) sync ;;
    can_fua) echo native ;;
    can_trim) exit 0 ;;
    trim)
        fallocate -p -o "$4" -l "$3" "$f" ;;
    can_zero) exit 0 ;;
    zero)
        # Without may_trim the range must stay allocated.
        case "$5" in
            *may_trim*) fallocate -p -o "$4" -l "$3" "$f" ;;
            *) fallocate -z -o "$4" -l "$3" "$f" ;;
        esac
        ;;
    can_multi_conn) exit 0 ;;
    *)
        exit 2 ;;
esac
