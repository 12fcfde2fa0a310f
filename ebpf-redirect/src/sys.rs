//! The few raw `bpf(2)` calls aya 0.14 does not expose in the shape needed here: link creation and
//! pinning for every cgroup program type (aya's `CgroupSockoptLink` cannot become an `FdLink`),
//! link → program id, and `BPF_PROG_QUERY` to find programs someone else attached.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `enum bpf_attach_type` values used here.
pub const ATTACH_INGRESS: u32 = 0;
pub const ATTACH_SOCK_OPS: u32 = 3;
pub const ATTACH_CONNECT4: u32 = 10;
pub const ATTACH_CONNECT6: u32 = 11;
pub const ATTACH_SENDMSG4: u32 = 14;
pub const ATTACH_SENDMSG6: u32 = 15;
pub const ATTACH_GETSOCKOPT: u32 = 21;

#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32_at(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64_at(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn get_u32(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.0[off..off + 4].try_into().unwrap())
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a zero-initialized, 8-aligned buffer at least as large as every field the
    // kernel reads for these commands; the kernel copies at most `size` bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            attr.0.len() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn fd_from(rc: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel returned a fresh file descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

fn cpath(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// `BPF_LINK_CREATE` for a cgroup program: flags 0 (cgroup links are always multi-attach; passing
/// `BPF_F_ALLOW_MULTI` here gives EINVAL, which is what aya's `AllowMultiple` does).
pub fn link_create(prog: impl AsFd, target: impl AsFd, attach_type: u32) -> io::Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32_at(0, prog.as_fd().as_raw_fd() as u32)
        .u32_at(4, target.as_fd().as_raw_fd() as u32)
        .u32_at(8, attach_type);
    bpf(BPF_LINK_CREATE, &mut a).map(fd_from)
}

/// `BPF_LINK_DETACH`: detaches the program now. Merely dropping the last reference (unpinning)
/// releases the link asynchronously, so a detach that only unpins can return while the program
/// still runs for a moment.
pub fn link_detach(link: impl AsFd) -> io::Result<()> {
    let mut a = Attr::new();
    a.u32_at(0, link.as_fd().as_raw_fd() as u32);
    bpf(BPF_LINK_DETACH, &mut a).map(|_| ())
}

pub fn obj_pin(fd: impl AsFd, path: &Path) -> io::Result<()> {
    let p = cpath(path)?;
    let mut a = Attr::new();
    a.u64_at(0, p.as_ptr() as u64)
        .u32_at(8, fd.as_fd().as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut a).map(|_| ())
}

pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let p = cpath(path)?;
    let mut a = Attr::new();
    a.u64_at(0, p.as_ptr() as u64);
    bpf(BPF_OBJ_GET, &mut a).map(fd_from)
}

fn obj_info(fd: impl AsFd, buf: &mut [u8]) -> io::Result<()> {
    let mut a = Attr::new();
    a.u32_at(0, fd.as_fd().as_raw_fd() as u32)
        .u32_at(4, buf.len() as u32)
        .u64_at(8, buf.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).map(|_| ())
}

/// `(link id, program id)` of a link.
pub fn link_ids(link: impl AsFd) -> io::Result<(u32, u32)> {
    let mut info = [0u8; 16];
    obj_info(link, &mut info)?;
    Ok((
        u32::from_ne_bytes(info[4..8].try_into().unwrap()),
        u32::from_ne_bytes(info[8..12].try_into().unwrap()),
    ))
}

/// The name of a loaded program, by id (empty if it is gone).
pub fn prog_name(id: u32) -> String {
    let mut a = Attr::new();
    a.u32_at(0, id);
    let Ok(fd) = bpf(BPF_PROG_GET_FD_BY_ID, &mut a).map(fd_from) else {
        return String::new();
    };
    let mut info = [0u8; 80];
    if obj_info(&fd, &mut info).is_err() {
        return String::new();
    }
    let name = &info[64..80];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    String::from_utf8_lossy(&name[..end]).into_owned()
}

/// Ids of the programs attached directly to a cgroup for one attach type.
pub fn prog_query(cgroup: impl AsFd, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut a = Attr::new();
    a.u32_at(0, cgroup.as_fd().as_raw_fd() as u32)
        .u32_at(4, attach_type)
        .u64_at(16, ids.as_mut_ptr() as u64)
        .u32_at(24, ids.len() as u32);
    bpf(BPF_PROG_QUERY, &mut a)?;
    let n = a.get_u32(24) as usize;
    ids.truncate(n.min(64));
    Ok(ids)
}
