//! An open export: the top handle of the backend chain for one connection,
//! with its capabilities read once, and the server-side defaults every
//! backend gets (request validation, FUA/zero/cache emulation, extents for
//! backends that know none).  Synchronous: called on blocking threads.

use nbdkit_backend::{
    read_and_discard, write_zeroes, BlockSize, CacheMode, DirectRead, Error, ErrorKind, Extents,
    FuaMode, Handle, Result, StatusKind, ThreadModel, ZeroFlags, ZeroMode,
};
use nbdkit_proto::*;

/// Largest READ or WRITE payload accepted (also the advertised maximum
/// block size when the backend gives none): 64 MiB, as nbdkit, so that no
/// client that works with nbdkit is refused.
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// At most this many block descriptors in one reply; the client asks again
/// for the rest, as the protocol allows.
const MAX_EXTENTS: usize = 128 * 1024;

/// What an export can do, read from the backend once at open.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub size: u64,
    pub writable: bool,
    pub flush: bool,
    pub rotational: bool,
    pub trim: bool,
    pub zero: ZeroMode,
    pub fast_zero: bool,
    pub extents: bool,
    pub fua: FuaMode,
    pub multi_conn: bool,
    pub cache: CacheMode,
    pub block_size: Option<BlockSize>,
    /// Refuse requests not aligned to `block_size.minimum` (see
    /// `Handle::enforce_block_size`).
    pub enforce_block_size: bool,
}

pub struct Export {
    pub handle: Box<dyn Handle>,
    pub caps: Caps,
    pub name: String,
    pub description: Option<String>,
}

/// A validated transmission request, ready to run.
#[derive(Debug, Clone, Copy)]
pub struct Op {
    pub command: u16,
    pub flags: u16,
    pub offset: u64,
    pub length: u64,
}

impl Export {
    /// Read the capabilities of a freshly opened handle.  `readonly` is the
    /// server's `-r`: it overrides whatever the backend says.
    pub fn new(handle: Box<dyn Handle>, name: String, readonly: bool) -> Result<Self> {
        let h = &*handle;
        let writable = !readonly && h.can_write()?;
        let zero = if writable {
            h.can_zero()?
        } else {
            ZeroMode::None
        };
        let block_size = h.block_size()?;
        if let Some(bs) = block_size {
            validate_block_size(bs)?;
        }
        let caps = Caps {
            size: h.size()?,
            writable,
            flush: h.can_flush()?,
            rotational: h.is_rotational()?,
            trim: writable && h.can_trim()?,
            zero,
            fast_zero: zero != ZeroMode::None && h.can_fast_zero()?,
            extents: h.can_extents()?,
            fua: if writable {
                h.can_fua()?
            } else {
                FuaMode::None
            },
            multi_conn: h.can_multi_conn()?,
            cache: h.can_cache()?,
            block_size,
            enforce_block_size: h.enforce_block_size()?,
        };
        let description = h.export_description()?;
        Ok(Export {
            handle,
            caps,
            name,
            description,
        })
    }

    /// As nbdkit: a server that serves one connection at a time does not
    /// advertise multi-conn, whatever the backend says.
    pub fn under_thread_model(mut self, model: ThreadModel) -> Self {
        if model <= ThreadModel::SerializeConnections {
            self.caps.multi_conn = false;
        }
        self
    }

    /// Transmission flags for this export.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let c = &self.caps;
        let mut f = FLAG_HAS_FLAGS;
        if !c.writable {
            f |= FLAG_READ_ONLY;
        }
        if c.flush {
            f |= FLAG_SEND_FLUSH;
        }
        if c.fua != FuaMode::None {
            f |= FLAG_SEND_FUA;
        }
        if c.rotational {
            f |= FLAG_ROTATIONAL;
        }
        if c.trim {
            f |= FLAG_SEND_TRIM;
        }
        if c.zero != ZeroMode::None {
            f |= FLAG_SEND_WRITE_ZEROES;
            if c.fast_zero {
                f |= FLAG_SEND_FAST_ZERO;
            }
        }
        if structured {
            f |= FLAG_SEND_DF;
        }
        if c.multi_conn {
            f |= FLAG_CAN_MULTI_CONN;
        }
        if c.cache != CacheMode::None {
            f |= FLAG_SEND_CACHE;
        }
        f
    }

    /// (minimum, preferred, maximum) advertised in NBD_INFO_BLOCK_SIZE.
    pub fn advertised_block_size(&self) -> (u32, u32, u32) {
        match self.caps.block_size {
            // The backend's maximum as it is, as nbdkit advertises it (the
            // blocksize filter says 4G-1: it splits requests itself).
            // READ and WRITE payloads stay bounded by MAX_PAYLOAD.
            Some(b) => (b.minimum, b.preferred, b.maximum),
            None => (1, 4096, MAX_PAYLOAD as u32),
        }
    }

    /// Check a request against the spec and this export's capabilities.
    /// `meta` says whether any metadata context was selected.
    pub fn validate(
        &self,
        h: &RequestHeader,
        structured: bool,
        extended: bool,
        meta: bool,
    ) -> Result<Op> {
        let c = &self.caps;
        // As nbdkit: a write-like request to a read-only export is EPERM
        // whatever else is wrong with it (flags, range, size).
        if !c.writable && matches!(h.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
            return Err(Error::read_only(format!(
                "{}: the export is read-only",
                command_name(h.command)
            )));
        }
        let allowed = match h.command {
            CMD_READ => {
                if structured {
                    CMD_FLAG_DF
                } else {
                    0
                }
            }
            CMD_WRITE => CMD_FLAG_FUA,
            CMD_TRIM => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            CMD_FLUSH | CMD_CACHE | CMD_DISC => 0,
            other => return Err(Error::invalid(format!("unknown command {other}"))),
        };
        // With extended headers a WRITE may say its payload length again.
        let allowed = if extended && h.command == CMD_WRITE {
            allowed | CMD_FLAG_PAYLOAD_LEN
        } else {
            allowed
        };
        if h.flags & !allowed != 0 {
            return Err(Error::invalid(format!(
                "flags 0x{:x} are not valid for {}",
                h.flags & !allowed,
                command_name(h.command)
            )));
        }
        if h.flags & CMD_FLAG_FUA != 0 && c.fua == FuaMode::None {
            return Err(Error::invalid("FUA was not advertised"));
        }
        if h.flags & CMD_FLAG_FAST_ZERO != 0 && !c.fast_zero {
            return Err(Error::invalid("fast zero was not advertised"));
        }
        match h.command {
            CMD_WRITE if !c.writable => return Err(Error::read_only("export is read-only")),
            CMD_TRIM if !c.trim => {
                return Err(if c.writable {
                    Error::invalid("trim was not advertised")
                } else {
                    Error::read_only("export is read-only")
                })
            }
            CMD_WRITE_ZEROES if c.zero == ZeroMode::None => {
                return Err(if c.writable {
                    Error::invalid("write zeroes was not advertised")
                } else {
                    Error::read_only("export is read-only")
                })
            }
            CMD_FLUSH if !c.flush => return Err(Error::invalid("flush was not advertised")),
            CMD_CACHE if c.cache == CacheMode::None => {
                return Err(Error::invalid("cache was not advertised"))
            }
            CMD_BLOCK_STATUS if !meta => {
                return Err(Error::invalid("no metadata context was negotiated"))
            }
            _ => {}
        }
        if matches!(h.command, CMD_FLUSH | CMD_DISC) {
            if h.offset != 0 || h.length != 0 {
                return Err(Error::invalid("offset and length must be zero"));
            }
            return Ok(op(h));
        }
        if h.length == 0 {
            return Err(Error::invalid("zero-length request"));
        }
        if matches!(h.command, CMD_READ | CMD_WRITE) && h.length > MAX_PAYLOAD {
            return Err(Error::overflow(format!(
                "request of {} bytes exceeds the maximum of {MAX_PAYLOAD}",
                h.length
            )));
        }
        let end = h.offset.checked_add(h.length);
        if end.is_none_or(|e| e > c.size) {
            let msg = format!(
                "offset {} + length {} is beyond the end of the export ({} bytes)",
                h.offset, h.length, c.size
            );
            return Err(match h.command {
                CMD_WRITE | CMD_WRITE_ZEROES => Error::new(ErrorKind::NoSpace, msg),
                _ => Error::invalid(msg),
            });
        }
        if let Some(bs) = c.block_size.filter(|_| c.enforce_block_size) {
            let min = bs.minimum as u64;
            // Block status is a query, and the last partial block may be
            // read in full; everything else must be aligned.
            if h.command != CMD_BLOCK_STATUS
                && (!h.offset.is_multiple_of(min)
                    || (!h.length.is_multiple_of(min) && h.offset + h.length != c.size))
            {
                return Err(Error::invalid(format!(
                    "request is not aligned to the minimum block size {min}"
                )));
            }
        }
        Ok(op(h))
    }

    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.handle.pread(buf, offset)
    }

    /// Where a read's bytes are, when the top of the chain can say
    /// ([`nbdkit_backend::direct`]).  Any answer not covering exactly
    /// `count` bytes is treated as none.
    pub fn read_direct(&self, offset: u64, count: u64) -> Option<DirectRead<'_>> {
        match self.handle.pread_direct(offset, count) {
            Ok(Some(d)) if d.len() == count => Some(d),
            _ => None,
        }
    }

    pub fn write(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let native = self.caps.fua == FuaMode::Native;
        self.handle.pwrite(buf, offset, fua && native)?;
        self.emulate_fua(fua)
    }

    pub fn flush(&self) -> Result<()> {
        self.handle.flush()
    }

    pub fn trim(&self, offset: u64, count: u64, fua: bool) -> Result<()> {
        let native = self.caps.fua == FuaMode::Native;
        self.handle.trim(offset, count, fua && native)?;
        self.emulate_fua(fua)
    }

    pub fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        let native_fua = self.caps.fua == FuaMode::Native;
        let pass = ZeroFlags {
            fua: flags.fua && native_fua,
            ..flags
        };
        match self.caps.zero {
            ZeroMode::Native => match self.handle.zero(offset, count, pass) {
                Err(e) if e.kind() == ErrorKind::NotSupported && !flags.fast => {
                    write_zeroes(&*self.handle, offset, count, pass)?
                }
                r => r?,
            },
            // Emulated through the top of the chain, so filters above the
            // plugin see the writes.
            _ => write_zeroes(&*self.handle, offset, count, pass)?,
        }
        self.emulate_fua(flags.fua)
    }

    fn emulate_fua(&self, fua: bool) -> Result<()> {
        if fua && self.caps.fua == FuaMode::Emulate {
            self.handle.flush()
        } else {
            Ok(())
        }
    }

    pub fn cache(&self, offset: u64, count: u64) -> Result<()> {
        match self.caps.cache {
            CacheMode::Native => self.handle.cache(offset, count),
            _ => read_and_discard(&*self.handle, offset, count),
        }
    }

    /// Block status for `[offset, offset+count)` as descriptors `(length,
    /// status)`: base:allocation flags for [`StatusKind::Allocation`],
    /// depths for [`StatusKind::Depth`].  Lengths fit in 32 bits unless
    /// `wide` (extended headers).
    pub fn block_status(
        &self,
        kind: StatusKind,
        offset: u64,
        count: u64,
        req_one: bool,
        wide: bool,
    ) -> Result<Vec<(u64, u32)>> {
        let limit = if wide { u64::MAX } else { u32::MAX as u64 };
        let count = count.min(self.caps.size - offset).min(limit);
        // As nbdkit, what the backend knows past the request is kept, up to
        // the end of the export: the last descriptor may run past the
        // requested range, which the spec allows and which saves a client
        // walking the disk a request per extent (a backend that answers in
        // whole blocks reports the whole block).  REQ_ONE gets exactly the
        // one extent within the request.
        let end = if req_one {
            offset + count
        } else {
            self.caps.size.min(offset.saturating_add(limit))
        };
        let mut ex = Extents::new(offset, end);
        match kind {
            // A backend without extents is all data (as nbdkit).
            StatusKind::Allocation if !self.caps.extents => ex.add(offset, count, 0)?,
            // Depth has no capability: every handle answers it (a plugin
            // with 1).
            _ => kind.query(&*self.handle, offset, count, req_one, &mut ex)?,
        }
        let list = ex.list();
        if list.is_empty() {
            return Err(Error::io("backend returned no extents"));
        }
        let keep = if req_one {
            1
        } else {
            list.len().min(MAX_EXTENTS)
        };
        // A depth is the whole status; allocation has two defined bits.
        let mask = match kind {
            StatusKind::Allocation => STATE_HOLE | STATE_ZERO,
            StatusKind::Depth => u32::MAX,
        };
        Ok(list[..keep]
            .iter()
            .map(|e| (e.length, e.flags & mask))
            .collect())
    }
}

fn op(h: &RequestHeader) -> Op {
    Op {
        command: h.command,
        flags: h.flags,
        offset: h.offset,
        length: h.length,
    }
}

fn validate_block_size(b: BlockSize) -> Result<()> {
    let ok = b.minimum.is_power_of_two()
        && b.minimum <= 65536
        && b.preferred.is_power_of_two()
        && b.preferred >= b.minimum.max(512)
        && b.maximum >= b.preferred.min(b.maximum)
        && b.maximum.is_multiple_of(b.minimum);
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "backend gave invalid block size constraints {b:?}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Disk;
    impl Handle for Disk {
        fn size(&self) -> Result<u64> {
            Ok(1 << 20)
        }
        fn can_write(&self) -> Result<bool> {
            Ok(true)
        }
        fn pread(&self, buf: &mut [u8], _o: u64) -> Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn pwrite(&self, _b: &[u8], _o: u64, _f: bool) -> Result<()> {
            Ok(())
        }
    }

    fn hdr(command: u16, flags: u16, offset: u64, length: u64) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 1,
            offset,
            length,
        }
    }

    /// A disk with a 4K minimum block size, which may leave the policy to
    /// a filter.
    struct Aligned(bool);
    impl Handle for Aligned {
        fn next(&self) -> Option<&dyn Handle> {
            Some(&Disk)
        }
        fn block_size(&self) -> Result<Option<BlockSize>> {
            Ok(Some(BlockSize {
                minimum: 4096,
                preferred: 4096,
                maximum: 1 << 20,
            }))
        }
        fn enforce_block_size(&self) -> Result<bool> {
            Ok(self.0)
        }
    }

    #[test]
    fn block_size_is_enforced_unless_the_backend_says_not() {
        let e = Export::new(Box::new(Aligned(true)), String::new(), false).unwrap();
        let v = |e: &Export, h| e.validate(&h, true, false, true).map_err(|e| e.kind());
        assert_eq!(
            v(&e, hdr(CMD_READ, 0, 512, 4096)).unwrap_err(),
            ErrorKind::InvalidInput
        );
        assert!(v(&e, hdr(CMD_READ, 0, 4096, 4096)).is_ok());
        // Block status is a query: any alignment.
        assert!(v(&e, hdr(CMD_BLOCK_STATUS, 0, 1, 1)).is_ok());
        let e = Export::new(Box::new(Aligned(false)), String::new(), false).unwrap();
        assert!(v(&e, hdr(CMD_READ, 0, 512, 1)).is_ok());
        assert_eq!(e.advertised_block_size(), (4096, 4096, 1 << 20));
    }

    #[test]
    fn validation_follows_the_spec() {
        let e = Export::new(Box::new(Disk), String::new(), false).unwrap();
        let v = |h| e.validate(&h, true, false, true).map_err(|e| e.kind());
        assert!(v(hdr(CMD_READ, 0, 0, 512)).is_ok());
        assert_eq!(
            v(hdr(CMD_READ, 0, 1 << 20, 1)).unwrap_err(),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            v(hdr(CMD_WRITE, 0, 1 << 20, 1)).unwrap_err(),
            ErrorKind::NoSpace
        );
        assert_eq!(
            v(hdr(CMD_READ, 0, u64::MAX, 2)).unwrap_err(),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            v(hdr(CMD_READ, CMD_FLAG_FUA, 0, 1)).unwrap_err(),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            v(hdr(CMD_READ, 0, 0, 0)).unwrap_err(),
            ErrorKind::InvalidInput
        );
        assert_eq!(v(hdr(99, 0, 0, 1)).unwrap_err(), ErrorKind::InvalidInput);
        // No flush capability: FUA is not advertised either.
        assert_eq!(
            v(hdr(CMD_WRITE, CMD_FLAG_FUA, 0, 1)).unwrap_err(),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            v(hdr(CMD_FLUSH, 0, 0, 0)).unwrap_err(),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            v(hdr(CMD_TRIM, 0, 0, 1)).unwrap_err(),
            ErrorKind::InvalidInput
        );
        assert!(v(hdr(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 1)).is_ok());
        assert_eq!(
            v(hdr(CMD_READ, 0, 0, MAX_PAYLOAD + 1)).unwrap_err(),
            ErrorKind::Overflow
        );
        let ro = Export::new(Box::new(Disk), String::new(), true).unwrap();
        // Read-only comes first: before FUA, range and size checks.
        for (cmd, flags, off, len) in [
            (CMD_WRITE, 0, 0, 1),
            (CMD_WRITE, CMD_FLAG_FUA, 0, 1),
            (CMD_WRITE, 0, 1 << 20, MAX_PAYLOAD + 1),
            (CMD_TRIM, CMD_FLAG_FUA, 0, 1),
            (CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 1),
        ] {
            assert_eq!(
                ro.validate(&hdr(cmd, flags, off, len), true, false, true)
                    .unwrap_err()
                    .kind(),
                ErrorKind::ReadOnly,
                "{cmd} {flags}"
            );
        }
        assert_ne!(ro.transmission_flags(true) & FLAG_READ_ONLY, 0);
    }
}
