//! `luks`: open a LUKSv1-encrypted disk (as made by `cryptsetup --type
//! luks1` or `qemu-img create -f luks`) with a passphrase and serve the
//! decrypted payload, read-write.  Supported: AES (128/192/256) in XTS,
//! CBC or ECB mode with plain, plain64 or ESSIV initial vectors, and
//! SHA-1/SHA-224/SHA-256/SHA-384/SHA-512 for PBKDF2 and the anti-forensic
//! splitter.  Anything else is refused with a message saying what.
//!
//! The master key is recovered once per distinct header (the first
//! connection pays the PBKDF2 cost).  Writes that do not cover whole
//! 512-byte sectors read, patch and rewrite the sectors they touch, under
//! a lock shared by all connections.

use std::sync::{Arc, Mutex};

use aes::cipher::array::Array;
use aes::cipher::consts::U16;
use aes::cipher::{
    BlockCipherDecrypt, BlockCipherEncrypt, BlockModeDecrypt, BlockModeEncrypt, InnerIvInit,
    KeyInit,
};
use aes::{Aes128, Aes192, Aes256};
use nbdkit_backend::LockExt;
use nbdkit_backend::{
    layer_fn, Backend, CacheMode, Config, ConfigError, Error, ErrorKind, Extents, FilterSpec,
    Handle, Layer, Param, Result, ZeroFlags, ZeroMode,
};
use sha2::Digest;
use xts_mode::Xts128;

const SECTOR: u64 = 512;
const HEADER_LEN: usize = 592;
const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
const KEY_ENABLED: u32 = 0x00AC_71F3;
const DIGEST_LEN: usize = 20;
/// Bounds that keep a hostile header from making us allocate or iterate
/// without end: key sizes of AES-XTS-256 at most, and the stripe count
/// every LUKSv1 implementation writes.
const MAX_KEY_BYTES: usize = 64;
const MAX_STRIPES: usize = 4000;

// ---------------------------------------------------------------- hashes

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hash {
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    fn parse(s: &str) -> Option<Hash> {
        Some(match s.to_ascii_lowercase().as_str() {
            "sha1" => Hash::Sha1,
            "sha224" => Hash::Sha224,
            "sha256" => Hash::Sha256,
            "sha384" => Hash::Sha384,
            "sha512" => Hash::Sha512,
            _ => return None,
        })
    }

    fn pbkdf2(self, password: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        match self {
            Hash::Sha1 => pbkdf2_hmac::<sha1::Sha1>(password, salt, rounds, out),
            Hash::Sha224 => pbkdf2_hmac::<sha2::Sha224>(password, salt, rounds, out),
            Hash::Sha256 => pbkdf2_hmac::<sha2::Sha256>(password, salt, rounds, out),
            Hash::Sha384 => pbkdf2_hmac::<sha2::Sha384>(password, salt, rounds, out),
            Hash::Sha512 => pbkdf2_hmac::<sha2::Sha512>(password, salt, rounds, out),
        }
    }

    fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            Hash::Sha1 => sha1::Sha1::digest(data).to_vec(),
            Hash::Sha224 => sha2::Sha224::digest(data).to_vec(),
            Hash::Sha256 => sha2::Sha256::digest(data).to_vec(),
            Hash::Sha384 => sha2::Sha384::digest(data).to_vec(),
            Hash::Sha512 => sha2::Sha512::digest(data).to_vec(),
        }
    }

    /// The anti-forensic splitter's diffusion: each digest-sized block
    /// becomes H(block number, big-endian u32 || block), cut to its length.
    fn diffuse(self, buf: &mut [u8]) {
        let len = self.digest(&[]).len();
        for (i, chunk) in buf.chunks_mut(len).enumerate() {
            let mut input = Vec::with_capacity(4 + chunk.len());
            input.extend_from_slice(&(i as u32).to_be_bytes());
            input.extend_from_slice(chunk);
            let d = self.digest(&input);
            chunk.copy_from_slice(&d[..chunk.len()]);
        }
    }

    /// Merge `stripes` stripes of `key_len` bytes into the key.
    fn af_merge(self, material: &[u8], key_len: usize, stripes: usize) -> Vec<u8> {
        let mut d = vec![0u8; key_len];
        for (i, stripe) in material.chunks(key_len).take(stripes).enumerate() {
            for (a, b) in d.iter_mut().zip(stripe) {
                *a ^= b;
            }
            if i + 1 < stripes {
                self.diffuse(&mut d);
            }
        }
        d
    }
}

// ---------------------------------------------------------------- ciphers

#[derive(Clone)]
enum Aes {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

impl Aes {
    fn new(key: &[u8]) -> Option<Aes> {
        Some(match key.len() {
            16 => Aes::A128(Aes128::new_from_slice(key).ok()?),
            24 => Aes::A192(Aes192::new_from_slice(key).ok()?),
            32 => Aes::A256(Aes256::new_from_slice(key).ok()?),
            _ => return None,
        })
    }

    fn encrypt_block(&self, b: &mut [u8; 16]) {
        let mut a = Array::<u8, U16>::from(*b);
        match self {
            Aes::A128(c) => c.encrypt_block(&mut a),
            Aes::A192(c) => c.encrypt_block(&mut a),
            Aes::A256(c) => c.encrypt_block(&mut a),
        }
        b.copy_from_slice(&a);
    }

    fn cbc(&self, iv: &[u8; 16], data: &mut [u8], encrypt: bool) {
        fn run<C>(c: &C, iv: &[u8; 16], data: &mut [u8], encrypt: bool)
        where
            C: BlockCipherEncrypt<BlockSize = U16> + BlockCipherDecrypt<BlockSize = U16> + Clone,
        {
            let iv = Array::<u8, U16>::from(*iv);
            let (blocks, _) = Array::<u8, U16>::slice_as_chunks_mut(data);
            if encrypt {
                cbc::Encryptor::<C>::inner_iv_init(c.clone(), &iv).encrypt_blocks(blocks);
            } else {
                cbc::Decryptor::<C>::inner_iv_init(c.clone(), &iv).decrypt_blocks(blocks);
            }
        }
        match self {
            Aes::A128(c) => run(c, iv, data, encrypt),
            Aes::A192(c) => run(c, iv, data, encrypt),
            Aes::A256(c) => run(c, iv, data, encrypt),
        }
    }

    fn ecb(&self, data: &mut [u8], encrypt: bool) {
        fn run<C>(c: &C, data: &mut [u8], encrypt: bool)
        where
            C: BlockCipherEncrypt<BlockSize = U16> + BlockCipherDecrypt<BlockSize = U16>,
        {
            let (blocks, _) = Array::<u8, U16>::slice_as_chunks_mut(data);
            if encrypt {
                c.encrypt_blocks(blocks);
            } else {
                c.decrypt_blocks(blocks);
            }
        }
        match self {
            Aes::A128(c) => run(c, data, encrypt),
            Aes::A192(c) => run(c, data, encrypt),
            Aes::A256(c) => run(c, data, encrypt),
        }
    }
}

enum Mode {
    Xts128(Box<Xts128<Aes128>>),
    Xts256(Box<Xts128<Aes256>>),
    Cbc(Aes),
    Ecb(Aes),
}

enum IvGen {
    /// No IV (ECB).
    Null,
    /// Sector number, little-endian, low 32 bits.
    Plain,
    /// Sector number, little-endian, 64 bits.
    Plain64,
    /// The sector number encrypted with a key that is the hash of the key.
    Essiv(Box<Aes>),
}

/// A cipher spec from a LUKS header, with its key.
struct SectorCipher {
    mode: Mode,
    iv: IvGen,
}

/// What the header names, checked before any key exists.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CipherSpec {
    mode: String,
    ivgen: String,
    essiv_hash: Option<Hash>,
}

impl CipherSpec {
    fn parse(name: &str, mode: &str, key_bytes: usize) -> std::result::Result<CipherSpec, String> {
        if !name.eq_ignore_ascii_case("aes") {
            return Err(format!("cipher '{name}' is not supported (only aes)"));
        }
        let (m, iv) = match mode.split_once('-') {
            Some((m, iv)) => (m.to_ascii_lowercase(), iv.to_ascii_lowercase()),
            None => (mode.to_ascii_lowercase(), String::new()),
        };
        let key_ok = match m.as_str() {
            "xts" => matches!(key_bytes, 32 | 64),
            "cbc" | "ecb" => matches!(key_bytes, 16 | 24 | 32),
            _ => {
                return Err(format!(
                    "cipher mode '{mode}' is not supported (xts, cbc, ecb)"
                ))
            }
        };
        if !key_ok {
            return Err(format!(
                "a {key_bytes}-byte key does not fit cipher mode '{mode}'"
            ));
        }
        let mut essiv_hash = None;
        match iv.as_str() {
            "" if m == "ecb" => {}
            "plain" | "plain64" if m != "ecb" => {}
            _ if m != "ecb" && iv.starts_with("essiv:") => {
                let h = &iv["essiv:".len()..];
                essiv_hash = Some(
                    Hash::parse(h).ok_or_else(|| format!("ESSIV hash '{h}' is not supported"))?,
                );
            }
            _ => return Err(format!("IV generator in '{mode}' is not supported")),
        }
        Ok(CipherSpec {
            mode: m,
            ivgen: iv,
            essiv_hash,
        })
    }

    fn with_key(&self, key: &[u8]) -> Option<SectorCipher> {
        let mode = match self.mode.as_str() {
            "xts" => {
                let (k1, k2) = key.split_at(key.len() / 2);
                match k1.len() {
                    16 => Mode::Xts128(Box::new(Xts128::new(
                        Aes128::new_from_slice(k1).ok()?,
                        Aes128::new_from_slice(k2).ok()?,
                    ))),
                    32 => Mode::Xts256(Box::new(Xts128::new(
                        Aes256::new_from_slice(k1).ok()?,
                        Aes256::new_from_slice(k2).ok()?,
                    ))),
                    _ => return None,
                }
            }
            "cbc" => Mode::Cbc(Aes::new(key)?),
            "ecb" => Mode::Ecb(Aes::new(key)?),
            _ => return None,
        };
        let iv = match (self.ivgen.as_str(), self.essiv_hash) {
            ("", _) => IvGen::Null,
            ("plain", _) => IvGen::Plain,
            ("plain64", _) => IvGen::Plain64,
            (_, Some(h)) => {
                // ESSIV's key: the hash of the key, which must be an AES key size.
                IvGen::Essiv(Box::new(Aes::new(&h.digest(key))?))
            }
            _ => return None,
        };
        Some(SectorCipher { mode, iv })
    }
}

impl SectorCipher {
    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match &self.iv {
            IvGen::Null => {}
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(c) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                c.encrypt_block(&mut iv);
            }
        }
        iv
    }

    /// En- or decrypt whole sectors in place; `first` numbers the first.
    fn crypt(&self, buf: &mut [u8], first: u64, encrypt: bool) {
        for (i, s) in buf.chunks_mut(SECTOR as usize).enumerate() {
            let iv = self.iv(first + i as u64);
            match &self.mode {
                Mode::Xts128(x) if encrypt => x.encrypt_sector(s, iv.into()),
                Mode::Xts128(x) => x.decrypt_sector(s, iv.into()),
                Mode::Xts256(x) if encrypt => x.encrypt_sector(s, iv.into()),
                Mode::Xts256(x) => x.decrypt_sector(s, iv.into()),
                Mode::Cbc(c) => c.cbc(&iv, s, encrypt),
                Mode::Ecb(c) => c.ecb(s, encrypt),
            }
        }
    }
}

// ---------------------------------------------------------------- header

#[derive(Debug, Clone)]
struct Slot {
    iterations: u32,
    salt: [u8; 32],
    material_offset: u64,
    stripes: usize,
}

#[derive(Debug, Clone)]
struct Header {
    spec: CipherSpec,
    hash: Hash,
    payload_offset: u64,
    key_bytes: usize,
    mk_digest: [u8; DIGEST_LEN],
    mk_salt: [u8; 32],
    mk_iterations: u32,
    slots: Vec<Slot>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn parse_header(b: &[u8; HEADER_LEN]) -> std::result::Result<Header, String> {
    if &b[..6] != MAGIC {
        return Err("this is not a LUKS disk (bad magic)".into());
    }
    let version = u16::from_be_bytes([b[6], b[7]]);
    if version != 1 {
        return Err(format!(
            "LUKS version {version} is not supported (only LUKSv1)"
        ));
    }
    let cipher_name = cstr(&b[8..40]);
    let cipher_mode = cstr(&b[40..72]);
    let hash_spec = cstr(&b[72..104]);
    let hash =
        Hash::parse(&hash_spec).ok_or_else(|| format!("hash '{hash_spec}' is not supported"))?;
    let payload_offset = u64::from(be32(b, 104)) * SECTOR;
    let key_bytes = be32(b, 108) as usize;
    if key_bytes == 0 || key_bytes > MAX_KEY_BYTES {
        return Err(format!("key size {key_bytes} bytes is not valid"));
    }
    let spec = CipherSpec::parse(&cipher_name, &cipher_mode, key_bytes)?;
    let mk_iterations = be32(b, 164);
    if mk_iterations == 0 {
        return Err("master key digest iterations are 0".into());
    }
    let mut slots = Vec::new();
    for i in 0..8 {
        let s = &b[208 + i * 48..208 + (i + 1) * 48];
        if be32(s, 0) != KEY_ENABLED {
            continue;
        }
        let stripes = be32(s, 44) as usize;
        let iterations = be32(s, 4);
        if stripes == 0 || stripes > MAX_STRIPES || iterations == 0 {
            return Err(format!(
                "key slot {i} is not valid ({stripes} stripes, {iterations} iterations)"
            ));
        }
        let mut salt = [0u8; 32];
        salt.copy_from_slice(&s[8..40]);
        slots.push(Slot {
            iterations,
            salt,
            material_offset: u64::from(be32(s, 40)) * SECTOR,
            stripes,
        });
    }
    let mut mk_digest = [0u8; DIGEST_LEN];
    mk_digest.copy_from_slice(&b[112..132]);
    let mut mk_salt = [0u8; 32];
    mk_salt.copy_from_slice(&b[132..164]);
    Ok(Header {
        spec,
        hash,
        payload_offset,
        key_bytes,
        mk_digest,
        mk_salt,
        mk_iterations,
        slots,
    })
}

/// Find the master key: try the passphrase on every active key slot.
fn unlock(h: &Header, next: &dyn Handle, passphrase: &[u8]) -> Result<SectorCipher> {
    let bad = |m: &str| Error::invalid(format!("luks: {m}"));
    if h.slots.is_empty() {
        return Err(bad("the disk has no active key slot"));
    }
    for (n, slot) in h.slots.iter().enumerate() {
        let mut slot_key = vec![0u8; h.key_bytes];
        h.hash
            .pbkdf2(passphrase, &slot.salt, slot.iterations, &mut slot_key);
        let cipher = h
            .spec
            .with_key(&slot_key)
            .ok_or_else(|| bad("cannot make the key slot cipher"))?;
        let len = h.key_bytes * slot.stripes;
        let sectors = (len as u64).div_ceil(SECTOR);
        let mut material = vec![0u8; (sectors * SECTOR) as usize];
        next.pread(&mut material, slot.material_offset)?;
        cipher.crypt(&mut material, 0, false);
        let key = h.hash.af_merge(&material, h.key_bytes, slot.stripes);
        let mut digest = [0u8; DIGEST_LEN];
        h.hash
            .pbkdf2(&key, &h.mk_salt, h.mk_iterations, &mut digest);
        if digest == h.mk_digest {
            tracing::debug!("luks: the passphrase opens key slot {n}");
            return h
                .spec
                .with_key(&key)
                .ok_or_else(|| bad("cannot make the payload cipher"));
        }
    }
    Err(Error::new(
        ErrorKind::PermissionDenied,
        "luks: the passphrase does not open any key slot",
    ))
}

// ---------------------------------------------------------------- filter

/// A passphrase the nbdkit way: `-` reads stdin, `-FD` a file descriptor,
/// `+FILE` a file, anything else is the passphrase; one trailing newline
/// is dropped.
fn read_passphrase(v: &str) -> std::result::Result<Vec<u8>, ConfigError> {
    use std::io::Read;
    let err = |e: std::io::Error| ConfigError::new(format!("luks: passphrase={v}: {e}"));
    let mut s = if v == "-" {
        let mut line = String::new();
        if atty_stdin() {
            eprint!("passphrase: ");
        }
        std::io::stdin().read_line(&mut line).map_err(err)?;
        line.into_bytes()
    } else if let Some(fd) = v
        .strip_prefix('-')
        .filter(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
    {
        let fd: i32 = fd
            .parse()
            .map_err(|_| ConfigError::new(format!("luks: passphrase={v}: bad file descriptor")))?;
        // Read through a duplicate, so the descriptor stays the caller's.
        // SAFETY: dup of a descriptor number; failure is checked.
        let dup = unsafe { libc::dup(fd) };
        if dup < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // SAFETY: `dup` is a fresh descriptor that we own.
        let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(dup) };
        let mut s = Vec::new();
        f.read_to_end(&mut s).map_err(err)?;
        s
    } else if let Some(path) = v.strip_prefix('+') {
        std::fs::read(path).map_err(err)?
    } else {
        return Ok(v.as_bytes().to_vec());
    };
    if s.ends_with(b"\n") {
        s.pop();
        if s.ends_with(b"\r") {
            s.pop();
        }
    }
    Ok(s)
}

fn atty_stdin() -> bool {
    // SAFETY: isatty on a descriptor number.
    unsafe { libc::isatty(libc::STDIN_FILENO) == 1 }
}

fn configure(c: &mut Config) -> std::result::Result<Box<dyn Layer>, ConfigError> {
    let v = c.require("passphrase", "luks filter")?;
    let passphrase = read_passphrase(&v)?;
    Ok(layer_fn(move |next| {
        Ok(Arc::new(Luks {
            next,
            passphrase,
            unlocked: Mutex::new(None),
            write_lock: Arc::new(Mutex::new(())),
        }))
    }))
}

/// The key recovered from one header, kept for the next connection.
struct Unlocked {
    header: [u8; HEADER_LEN],
    cipher: Arc<SectorCipher>,
    payload_offset: u64,
}

struct Luks {
    next: Arc<dyn Backend>,
    passphrase: Vec<u8>,
    unlocked: Mutex<Option<Unlocked>>,
    /// Serialises read-modify-write of partial sectors across connections.
    write_lock: Arc<Mutex<()>>,
}

impl Backend for Luks {
    fn name(&self) -> &str {
        "luks"
    }
    fn next(&self) -> Option<&dyn Backend> {
        Some(&*self.next)
    }
    fn open(&self, readonly: bool, export: &str) -> Result<Box<dyn Handle>> {
        let next = self.next.open(readonly, export)?;
        let size = next.size()?;
        if size < HEADER_LEN as u64 {
            return Err(Error::invalid(
                "luks: the disk is too small to hold a LUKS header",
            ));
        }
        let mut raw = [0u8; HEADER_LEN];
        next.pread(&mut raw, 0)?;
        let mut cache = self.unlocked.lock_unpoisoned();
        let (cipher, payload_offset) = match cache.as_ref() {
            Some(u) if u.header == raw => (u.cipher.clone(), u.payload_offset),
            _ => {
                let h = parse_header(&raw).map_err(|m| Error::invalid(format!("luks: {m}")))?;
                let cipher = Arc::new(unlock(&h, &*next, &self.passphrase)?);
                *cache = Some(Unlocked {
                    header: raw,
                    cipher: cipher.clone(),
                    payload_offset: h.payload_offset,
                });
                (cipher, h.payload_offset)
            }
        };
        drop(cache);
        if payload_offset > size {
            return Err(Error::invalid(format!(
                "luks: the payload offset {payload_offset} is beyond the end of the disk ({size})"
            )));
        }
        Ok(Box::new(LuksHandle {
            next,
            cipher,
            payload: payload_offset,
            size: (size - payload_offset) / SECTOR * SECTOR,
            write_lock: self.write_lock.clone(),
        }))
    }
}

struct LuksHandle {
    next: Box<dyn Handle>,
    cipher: Arc<SectorCipher>,
    /// Where the encrypted payload starts in the plugin.
    payload: u64,
    /// Size of the decrypted disk (whole sectors).
    size: u64,
    write_lock: Arc<Mutex<()>>,
}

impl LuksHandle {
    /// The whole sectors around `[offset, offset+len)`.
    fn span(&self, offset: u64, len: usize) -> Result<(u64, u64)> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| Error::overflow("luks: request beyond the end of the disk"))?;
        Ok((offset / SECTOR * SECTOR, end.div_ceil(SECTOR) * SECTOR))
    }

    /// Read and decrypt whole sectors `[start, end)` of the payload.
    fn read_sectors(&self, start: u64, end: u64) -> Result<Vec<u8>> {
        let mut b = vec![0u8; (end - start) as usize];
        self.next.pread(&mut b, self.payload + start)?;
        self.cipher.crypt(&mut b, start / SECTOR, false);
        Ok(b)
    }
}

impl Handle for LuksHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    // Zeroes must be encrypted: the server writes them through pwrite.
    fn can_zero(&self) -> Result<ZeroMode> {
        Ok(if self.next.can_write()? {
            ZeroMode::Emulate
        } else {
            ZeroMode::None
        })
    }
    nbdkit_backend::capabilities! {
        can_fast_zero: false, can_trim: false, can_extents: false, can_cache: CacheMode::Emulate,
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let (start, end) = self.span(offset, buf.len())?;
        let plain = self.read_sectors(start, end)?;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&plain[at..at + buf.len()]);
        Ok(())
    }
    fn pwrite(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        let (start, end) = self.span(offset, buf.len())?;
        let _g = self.write_lock.lock_unpoisoned();
        let mut data = if start == offset && end == offset + buf.len() as u64 {
            buf.to_vec()
        } else {
            let mut d = self.read_sectors(start, end)?;
            let at = (offset - start) as usize;
            d[at..at + buf.len()].copy_from_slice(buf);
            d
        };
        self.cipher.crypt(&mut data, start / SECTOR, true);
        self.next.pwrite(&data, self.payload + start, fua)
    }
    fn trim(&self, _offset: u64, _count: u64, _fua: bool) -> Result<()> {
        Err(Error::not_supported("luks: trim is not supported"))
    }
    fn zero(&self, offset: u64, count: u64, flags: ZeroFlags) -> Result<()> {
        nbdkit_backend::write_zeroes(self, offset, count, flags)
    }
    fn extents(
        &self,
        offset: u64,
        count: u64,
        _req_one: bool,
        extents: &mut Extents,
    ) -> Result<()> {
        extents.add(offset, count, 0)
    }
    /// The plaintext is made here: one image of depth 1 (as qemu's own
    /// luks driver reports), whatever the ciphertext's layout below.
    fn allocation_depth(
        &self,
        offset: u64,
        count: u64,
        _req_one: bool,
        extents: &mut Extents,
    ) -> Result<()> {
        extents.add(offset, count, 1)
    }
    fn cache(&self, offset: u64, count: u64) -> Result<()> {
        nbdkit_backend::read_and_discard(self, offset, count)
    }
}

pub static SPEC: FilterSpec = FilterSpec {
    name: "luks",
    summary: "open a LUKSv1-encrypted disk with a passphrase (read-write)",
    description: "Serves the decrypted payload of a LUKSv1 disk (cryptsetup --type luks1,\n\
qemu-img create -f luks).  AES in XTS, CBC or ECB mode with plain, plain64\n\
or ESSIV IVs; SHA-1 and SHA-2 hashes.\n\n\
Example:\n  nbdkit-rs file encrypted.img --filter=luks passphrase=+/tmp/secret",
    params: &[Param {
        name: "passphrase",
        help: "SECRET|+FILE|-|-FD: the passphrase, or where to read it (required)",
    }],
    configure,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cipher_specs() {
        assert!(CipherSpec::parse("aes", "xts-plain64", 64).is_ok());
        assert!(CipherSpec::parse("aes", "cbc-essiv:sha256", 32).is_ok());
        assert!(CipherSpec::parse("aes", "xts-plain64", 16).is_err());
        assert!(CipherSpec::parse("twofish", "xts-plain64", 64).is_err());
        assert!(CipherSpec::parse("aes", "cbc-benbi", 32).is_err());
        assert!(CipherSpec::parse("aes", "ecb", 16).is_ok());
    }

    #[test]
    fn sectors_round_trip() {
        for (mode, key) in [
            ("xts-plain64", 64),
            ("xts-plain", 32),
            ("cbc-essiv:sha256", 16),
            ("cbc-plain64", 32),
            ("ecb", 24),
        ] {
            let c = CipherSpec::parse("aes", mode, key)
                .unwrap()
                .with_key(&vec![7u8; key])
                .unwrap();
            let plain: Vec<u8> = (0..2048u32).map(|i| i as u8).collect();
            let mut b = plain.clone();
            c.crypt(&mut b, 5, true);
            assert_ne!(b, plain);
            c.crypt(&mut b, 5, false);
            assert_eq!(b, plain, "{mode}");
        }
    }

    #[test]
    fn garbage_headers_are_refused() {
        let mut b = [0u8; HEADER_LEN];
        assert!(parse_header(&b).is_err());
        b[..6].copy_from_slice(MAGIC);
        b[7] = 1;
        b[8..11].copy_from_slice(b"aes");
        b[40..51].copy_from_slice(b"xts-plain64");
        b[72..78].copy_from_slice(b"sha256");
        b[108..112].copy_from_slice(&1000u32.to_be_bytes());
        assert!(parse_header(&b).is_err());
    }
}
