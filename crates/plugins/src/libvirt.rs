//! `libvirt`: serve a libvirt guest's disk, read-only, by domain name and
//! disk — for backing up or inspecting a guest without knowing where its
//! storage lives.
//!
//! Reads go through libvirt's block-peek call (`virDomainBlockPeek`, which
//! libvirt allows on read-write connections only, so the connection is one
//! even though nothing is ever written), so
//! they work for remote hypervisors and for disks this process could not
//! open itself.  Drivers without block peek (libvirt's `test:` driver, some
//! hypervisors) fall back to the disk's source path from the domain XML,
//! read directly when it is a local file or block device.  Either way the
//! bytes are the disk *image* as stored on the host (a qcow2 disk is served
//! as qcow2), as with nbdkit's libvirt plugin.
//!
//! libvirt is loaded at run time (`libvirt.so.0`, Debian's `libvirt0`)
//! rather than linked: the `virt-sys` bindings pin an exact `libc` version
//! that conflicts with the rest of the workspace, and loading at run time
//! keeps every other plugin usable on machines without libvirt.  The nine
//! functions used are declared below from libvirt's documented API.

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr, CString};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock};

use nbdkit_backend::{Backend, ConfigError, Error, ErrorKind, Handle, Param, PluginSpec, Result};

/// `virDomainBlockInfo`: capacity, allocation, physical.
#[repr(C)]
#[derive(Default)]
struct BlockInfo {
    capacity: c_ulonglong,
    allocation: c_ulonglong,
    physical: c_ulonglong,
}

/// libvirt's error code for "this driver does not do that".
const VIR_ERR_NO_SUPPORT: c_int = 3;
/// Block peek requests are split into pieces this size (the remote driver
/// limits one call's buffer).
const PEEK_CHUNK: usize = 64 << 10;

type Ptr = *mut c_void;

/// The libvirt functions used, resolved from libvirt.so.0.
struct Api {
    _lib: libloading::Library,
    open: unsafe extern "C" fn(*const c_char) -> Ptr,
    set_error_func:
        unsafe extern "C" fn(*mut c_void, Option<unsafe extern "C" fn(*mut c_void, *mut c_void)>),
    close: unsafe extern "C" fn(Ptr) -> c_int,
    lookup_by_name: unsafe extern "C" fn(Ptr, *const c_char) -> Ptr,
    domain_free: unsafe extern "C" fn(Ptr) -> c_int,
    get_xml_desc: unsafe extern "C" fn(Ptr, c_uint) -> *mut c_char,
    block_peek:
        unsafe extern "C" fn(Ptr, *const c_char, c_ulonglong, usize, *mut c_void, c_uint) -> c_int,
    block_info: unsafe extern "C" fn(Ptr, *const c_char, *mut BlockInfo, c_uint) -> c_int,
    last_message: unsafe extern "C" fn() -> *const c_char,
    last_code: unsafe extern "C" fn() -> c_int,
}

impl Api {
    fn load() -> std::result::Result<Api, String> {
        // SAFETY: loading libvirt runs its constructors, which are safe to
        // run in any process; each symbol is given the C signature
        // libvirt's public headers declare for it.
        unsafe {
            let lib = libloading::Library::new("libvirt.so.0")
                .map_err(|e| format!("cannot load libvirt.so.0 ({e}); install libvirt0"))?;
            macro_rules! sym {
                ($name:literal) => {
                    *lib.get($name)
                        .map_err(|e| format!("libvirt.so.0 lacks {}: {e}", stringify!($name)))?
                };
            }
            Ok(Api {
                open: sym!(b"virConnectOpen\0"),
                set_error_func: sym!(b"virSetErrorFunc\0"),
                close: sym!(b"virConnectClose\0"),
                lookup_by_name: sym!(b"virDomainLookupByName\0"),
                domain_free: sym!(b"virDomainFree\0"),
                get_xml_desc: sym!(b"virDomainGetXMLDesc\0"),
                block_peek: sym!(b"virDomainBlockPeek\0"),
                block_info: sym!(b"virDomainGetBlockInfo\0"),
                last_message: sym!(b"virGetLastErrorMessage\0"),
                last_code: sym!(b"virGetLastErrorCode\0"),
                _lib: lib,
            })
        }
    }

    /// The calling thread's last libvirt error.
    fn last_error(&self) -> (c_int, String) {
        // SAFETY: both functions read thread-local state; the message is
        // a static or thread-local string valid until the next call.
        unsafe {
            let msg = (self.last_message)();
            let text = if msg.is_null() {
                "unknown libvirt error".to_string()
            } else {
                CStr::from_ptr(msg).to_string_lossy().into_owned()
            };
            ((self.last_code)(), text)
        }
    }
}

/// libvirt's error callback: errors are read back with
/// `virGetLastErrorMessage` instead of printed.
unsafe extern "C" fn ignore_error(_user: *mut c_void, _err: *mut c_void) {}

/// A connection and a domain, released together.
struct Domain {
    api: Arc<Api>,
    conn: Ptr,
    dom: Ptr,
}

// SAFETY: libvirt connection and domain objects are reference counted and
// documented as safe to use from several threads.
unsafe impl Send for Domain {}
// SAFETY: as for Send: libvirt serialises calls on one object itself.
unsafe impl Sync for Domain {}

impl Drop for Domain {
    fn drop(&mut self) {
        // SAFETY: both pointers came from libvirt and are released once.
        unsafe {
            (self.api.domain_free)(self.dom);
            (self.api.close)(self.conn);
        }
    }
}

/// How reads reach the disk.
enum Access {
    Peek {
        domain: Domain,
        disk: CString,
    },
    /// The disk's source, opened directly (drivers without block peek).
    Source(std::fs::File),
}

struct Resolved {
    access: Access,
    size: u64,
    /// For messages: "domain/disk (source)".
    name: String,
}

/// A disk of the domain XML: its target device and source path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DiskEntry {
    target: String,
    source: Option<String>,
}

/// The `<disk>` elements of a domain's XML.
fn disks_of(xml: &str) -> std::result::Result<Vec<DiskEntry>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("domain XML: {e}"))?;
    let mut out = Vec::new();
    for disk in doc.descendants().filter(|n| n.has_tag_name("disk")) {
        let child = |name: &str| disk.children().find(|c| c.has_tag_name(name));
        let Some(target) = child("target").and_then(|t| t.attribute("dev")) else {
            continue;
        };
        let source = child("source").and_then(|s| {
            s.attribute("file")
                .or_else(|| s.attribute("dev"))
                .or_else(|| s.attribute("volume"))
                .or_else(|| s.attribute("name"))
                .map(str::to_string)
        });
        out.push(DiskEntry {
            target: target.to_string(),
            source,
        });
    }
    Ok(out)
}

/// The disk named by `disk=`: a target device (`vda`) or a source path.
fn find_disk<'a>(disks: &'a [DiskEntry], disk: &str) -> Option<&'a DiskEntry> {
    disks
        .iter()
        .find(|d| d.target == disk)
        .or_else(|| disks.iter().find(|d| d.source.as_deref() == Some(disk)))
}

struct Libvirt {
    api: Arc<Api>,
    connect: Option<String>,
    domain: String,
    disk: String,
    resolved: OnceLock<std::result::Result<Arc<Resolved>, String>>,
}

impl Libvirt {
    /// Connect and find the disk; done once, after any fork (libvirt
    /// connections may start threads).
    fn resolve(&self) -> std::result::Result<Arc<Resolved>, String> {
        let api = &self.api;
        let uri = self
            .connect
            .as_deref()
            .map(|u| CString::new(u).map_err(|_| "connect= contains a NUL byte".to_string()))
            .transpose()?;
        let name = CString::new(self.domain.as_str())
            .map_err(|_| "domain= contains a NUL byte".to_string())?;
        // SAFETY: NUL-terminated strings that outlive the calls; a null
        // URI means libvirt's default connection.
        let conn = unsafe {
            // libvirt prints every error to stderr unless given a handler;
            // we report errors ourselves, once, with context.
            (api.set_error_func)(std::ptr::null_mut(), Some(ignore_error));
            (api.open)(uri.as_ref().map_or(std::ptr::null(), |u| u.as_ptr()))
        };
        if conn.is_null() {
            return Err(format!(
                "cannot connect to {}: {}",
                self.connect.as_deref().unwrap_or("the default hypervisor"),
                api.last_error().1
            ));
        }
        // SAFETY: a live connection and a NUL-terminated name.
        let dom = unsafe { (api.lookup_by_name)(conn, name.as_ptr()) };
        if dom.is_null() {
            let e = api.last_error().1;
            // SAFETY: the connection is ours to close.
            unsafe { (api.close)(conn) };
            return Err(format!("no domain {:?}: {e}", self.domain));
        }
        let domain = Domain {
            api: api.clone(),
            conn,
            dom,
        };
        // SAFETY: a live domain; the returned string is ours to free.
        let xml = unsafe {
            let p = (api.get_xml_desc)(dom, 0);
            if p.is_null() {
                return Err(format!(
                    "cannot read the domain XML: {}",
                    api.last_error().1
                ));
            }
            let s = CStr::from_ptr(p).to_string_lossy().into_owned();
            libc::free(p.cast());
            s
        };
        let disks = disks_of(&xml)?;
        let entry = find_disk(&disks, &self.disk).ok_or_else(|| {
            let names: Vec<&str> = disks.iter().map(|d| d.target.as_str()).collect();
            format!(
                "domain {:?} has no disk {:?} (its disks: {})",
                self.domain,
                self.disk,
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )
        })?;
        let label = format!(
            "{}/{} ({})",
            self.domain,
            entry.target,
            entry.source.as_deref().unwrap_or("no source")
        );
        let target = CString::new(entry.target.as_str()).expect("from XML text, no NUL");

        // Block peek works for this driver if a one-byte peek does.
        let mut probe = [0u8; 1];
        // SAFETY: a live domain, a NUL-terminated disk name and a buffer of
        // the size passed.
        let peeked =
            unsafe { (api.block_peek)(dom, target.as_ptr(), 0, 1, probe.as_mut_ptr().cast(), 0) };
        if peeked == 0 {
            let mut info = BlockInfo::default();
            // SAFETY: as above, with an out-structure of libvirt's layout.
            let r = unsafe { (api.block_info)(dom, target.as_ptr(), &mut info, 0) };
            if r != 0 {
                return Err(format!(
                    "cannot get the size of {label}: {}",
                    api.last_error().1
                ));
            }
            tracing::debug!("libvirt: {label}: reading with block peek");
            return Ok(Arc::new(Resolved {
                access: Access::Peek {
                    domain,
                    disk: target,
                },
                size: info.capacity,
                name: label,
            }));
        }
        let (code, peek_err) = api.last_error();
        let Some(source) = entry.source.as_deref().filter(|s| s.starts_with('/')) else {
            return Err(format!(
                "{label}: block peek failed ({peek_err}) and the disk has no local source path"
            ));
        };
        if code != VIR_ERR_NO_SUPPORT {
            tracing::info!("libvirt: {label}: block peek failed ({peek_err}); reading the source");
        }
        let file = std::fs::File::open(source).map_err(|e| {
            format!("{label}: block peek is not available ({peek_err}) and the source cannot be opened: {e}")
        })?;
        let size = source_size(&file).map_err(|e| format!("{label}: {e}"))?;
        tracing::debug!("libvirt: {label}: reading the source directly");
        Ok(Arc::new(Resolved {
            access: Access::Source(file),
            size,
            name: label,
        }))
    }

    fn resolved(&self) -> Result<Arc<Resolved>> {
        self.resolved
            .get_or_init(|| self.resolve())
            .clone()
            .map_err(|e| Error::io(format!("libvirt: {e}")))
    }
}

/// Size of a regular file or block device.
fn source_size(f: &std::fs::File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let meta = f.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    let mut f = f;
    f.seek(SeekFrom::End(0))
}

impl Backend for Libvirt {
    fn name(&self) -> &str {
        "libvirt"
    }
    fn after_fork(&self) -> Result<()> {
        self.resolved().map(drop)
    }
    fn open(&self, _readonly: bool, _export: &str) -> Result<Box<dyn Handle>> {
        Ok(Box::new(LibvirtHandle {
            r: self.resolved()?,
        }))
    }
}

struct LibvirtHandle {
    r: Arc<Resolved>,
}

impl Handle for LibvirtHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.r.size)
    }
    fn source_name(&self) -> Option<String> {
        Some(self.r.name.clone())
    }
    nbdkit_backend::capabilities! {
        can_write: false,
        // Read-only: every connection sees the same bytes.
        can_multi_conn: true,
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.r.access {
            Access::Source(f) => f
                .read_exact_at(buf, offset)
                .map_err(|e| Error::io(format!("libvirt: {}: read at {offset}: {e}", self.r.name))),
            Access::Peek { domain, disk } => {
                let mut done = 0;
                for piece in buf.chunks_mut(PEEK_CHUNK) {
                    let at = offset + done as u64;
                    let n = piece.len();
                    // SAFETY: a live domain, a NUL-terminated disk name, and
                    // a buffer of exactly `n` bytes.
                    let r = unsafe {
                        (domain.api.block_peek)(
                            domain.dom,
                            disk.as_ptr(),
                            at,
                            n,
                            piece.as_mut_ptr().cast(),
                            0,
                        )
                    };
                    if r != 0 {
                        return Err(Error::new(
                            ErrorKind::Io,
                            format!(
                                "libvirt: {}: block peek at {at}: {}",
                                self.r.name,
                                domain.api.last_error().1
                            ),
                        ));
                    }
                    done += n;
                }
                Ok(())
            }
        }
    }
}

pub static SPEC: PluginSpec = PluginSpec {
    name: "libvirt",
    summary: "a libvirt guest's disk, read-only, by domain and disk",
    description: "Reads with libvirt's block peek; drivers without it fall back to the\n\
disk's local source file.  The bytes are the disk image as stored (qcow2\n\
stays qcow2).  Needs libvirt.so.0 (Debian: libvirt0) at run time.\n\n\
Example:\n  nbdkit-rs -r libvirt connect=qemu:///system domain=guest disk=vda",
    magic_config_key: None,
    params: &[
        Param {
            name: "connect",
            help: "libvirt URI (default: libvirt's default connection)",
        },
        Param {
            name: "domain",
            help: "the guest's name (required)",
        },
        Param {
            name: "disk",
            help: "the disk's target device (vda, sda) or source path (required)",
        },
    ],
    create: |cfg| {
        let domain = cfg.require("domain", "libvirt plugin")?;
        let disk = cfg.require("disk", "libvirt plugin")?;
        let connect = cfg.take("connect");
        let api = Api::load().map_err(|e| ConfigError::new(format!("libvirt plugin: {e}")))?;
        Ok(Arc::new(Libvirt {
            api: Arc::new(api),
            connect,
            domain,
            disk,
            resolved: OnceLock::new(),
        }))
    },
};

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<domain type='kvm'>
      <name>g</name>
      <devices>
        <disk type='file' device='disk'>
          <driver name='qemu' type='qcow2'/>
          <source file='/var/lib/libvirt/images/g.qcow2'/>
          <target dev='vda' bus='virtio'/>
        </disk>
        <disk type='block' device='disk'>
          <source dev='/dev/vg/data'/>
          <target dev='vdb' bus='virtio'/>
        </disk>
        <disk type='file' device='cdrom'>
          <target dev='sda' bus='sata'/>
        </disk>
      </devices>
    </domain>"#;

    #[test]
    fn disks_are_found_by_target_or_source() {
        let disks = disks_of(XML).unwrap();
        assert_eq!(disks.len(), 3);
        assert_eq!(
            find_disk(&disks, "vdb").unwrap().source.as_deref(),
            Some("/dev/vg/data")
        );
        assert_eq!(
            find_disk(&disks, "/var/lib/libvirt/images/g.qcow2")
                .unwrap()
                .target,
            "vda"
        );
        assert_eq!(find_disk(&disks, "sda").unwrap().source, None);
        assert!(find_disk(&disks, "vdz").is_none());
        assert!(disks_of("<domain><devices>").is_err());
    }
}
