# A 1 MiB RAM disk as an nbdkit Tcl plugin (tests/language_plugins.rs).
set disk [binary format x1048576]

proc plugin_open {readonly} {
    return 1
}

proc get_size {h} {
    global disk
    return [string length $disk]
}

proc pread {h count offset} {
    global disk
    return [string range $disk $offset [expr {$offset + $count - 1}]]
}

proc pwrite {h buf offset} {
    global disk
    set last [expr {$offset + [string length $buf] - 1}]
    set disk [string replace $disk $offset $last $buf]
}
