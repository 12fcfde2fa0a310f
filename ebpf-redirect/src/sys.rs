//! The few raw `bpf(2)` calls aya 0.14 does not expose in the shape needed here: link creation and
//! pinning for every cgroup program type (aya's `CgroupSockoptLink` cannot become an `FdLink`),
//! link → program id, and `BPF_PROG_QUERY` to find programs someone else attached. The argument
//! and info structs are the kernel's, from aya-obj's generated bindings.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use aya_obj::generated::{bpf_attr, bpf_link_info, bpf_prog_info};

const BPF_PROG_ATTACH: libc::c_long = 8;
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
pub const ATTACH_SK_MSG_VERDICT: u32 = 7;
pub const ATTACH_CONNECT4: u32 = 10;
pub const ATTACH_CONNECT6: u32 = 11;
pub const ATTACH_SENDMSG4: u32 = 14;
pub const ATTACH_SENDMSG6: u32 = 15;
pub const ATTACH_GETSOCKOPT: u32 = 21;

/// A zeroed `union bpf_attr` (the kernel's own layout, from aya-obj's generated bindings, so no
/// offset is counted by hand). Zero is what the kernel expects in every field a command does not
/// use, and in the tail beyond what it knows — which is why callers set fields one by one:
/// assigning a whole member struct would copy its padding, which is not zero, and the kernel
/// answers EINVAL to non-zero bytes past a command's last field.
fn attr() -> bpf_attr {
    // SAFETY: `bpf_attr` is a C union of integers and arrays of integers: all-zero bytes are a
    // valid value of it.
    unsafe { std::mem::zeroed() }
}

fn bpf(cmd: libc::c_long, attr: &mut bpf_attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialized `bpf_attr` and we pass its exact size; the kernel
    // reads and writes at most that many bytes, and only the member `cmd` uses.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>() as libc::c_uint,
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
    let mut a = attr();
    a.link_create.__bindgen_anon_1.prog_fd = prog.as_fd().as_raw_fd() as u32;
    a.link_create.__bindgen_anon_2.target_fd = target.as_fd().as_raw_fd() as u32;
    a.link_create.attach_type = attach_type;
    bpf(BPF_LINK_CREATE, &mut a).map(fd_from)
}

/// `BPF_PROG_ATTACH` of an `sk_msg` program to a sockmap or sockhash: the map holds the program
/// for as long as it lives (pinned, here), so no link is needed (links for maps need Linux 6.10).
pub fn prog_attach(prog: impl AsFd, map: impl AsFd, attach_type: u32) -> io::Result<()> {
    let mut a = attr();
    a.__bindgen_anon_5.__bindgen_anon_1.target_fd = map.as_fd().as_raw_fd() as u32;
    a.__bindgen_anon_5.attach_bpf_fd = prog.as_fd().as_raw_fd() as u32;
    a.__bindgen_anon_5.attach_type = attach_type;
    bpf(BPF_PROG_ATTACH, &mut a).map(|_| ())
}

/// `BPF_LINK_DETACH`: detaches the program now. Merely dropping the last reference (unpinning)
/// releases the link asynchronously, so a detach that only unpins can return while the program
/// still runs for a moment.
pub fn link_detach(link: impl AsFd) -> io::Result<()> {
    let mut a = attr();
    a.link_detach.link_fd = link.as_fd().as_raw_fd() as u32;
    bpf(BPF_LINK_DETACH, &mut a).map(|_| ())
}

pub fn obj_pin(fd: impl AsFd, path: &Path) -> io::Result<()> {
    let p = cpath(path)?;
    let mut a = attr();
    a.__bindgen_anon_4.pathname = p.as_ptr() as u64;
    a.__bindgen_anon_4.bpf_fd = fd.as_fd().as_raw_fd() as u32;
    bpf(BPF_OBJ_PIN, &mut a).map(|_| ())
}

pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let p = cpath(path)?;
    let mut a = attr();
    a.__bindgen_anon_4.pathname = p.as_ptr() as u64;
    bpf(BPF_OBJ_GET, &mut a).map(fd_from)
}

/// `BPF_OBJ_GET_INFO_BY_FD` into `info` (`bpf_link_info`, `bpf_prog_info`: plain C structs).
fn obj_info<T: Copy>(fd: impl AsFd, info: &mut T) -> io::Result<()> {
    let mut a = attr();
    a.info.bpf_fd = fd.as_fd().as_raw_fd() as u32;
    a.info.info_len = std::mem::size_of::<T>() as u32;
    a.info.info = info as *mut T as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).map(|_| ())
}

/// A zeroed info struct for [`obj_info`].
fn zeroed_info<T: Copy>() -> T {
    // SAFETY: only instantiated with `bpf_link_info` / `bpf_prog_info`, C structs (and unions)
    // of integers and integer arrays, for which all-zero bytes are a valid value.
    unsafe { std::mem::zeroed() }
}

/// `(link id, program id)` of a link.
pub fn link_ids(link: impl AsFd) -> io::Result<(u32, u32)> {
    let mut info: bpf_link_info = zeroed_info();
    obj_info(link, &mut info)?;
    Ok((info.id, info.prog_id))
}

/// The name of a loaded program, by id (empty if it is gone).
pub fn prog_name(id: u32) -> String {
    let mut a = attr();
    a.__bindgen_anon_6.__bindgen_anon_1.prog_id = id;
    let Ok(fd) = bpf(BPF_PROG_GET_FD_BY_ID, &mut a).map(fd_from) else {
        return String::new();
    };
    let mut info: bpf_prog_info = zeroed_info();
    if obj_info(&fd, &mut info).is_err() {
        return String::new();
    }
    let name: Vec<u8> = info
        .name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&name).into_owned()
}

/// Ids of the programs attached directly to a cgroup for one attach type.
pub fn prog_query(cgroup: impl AsFd, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut a = attr();
    // `prog_ids` points to `ids`, which outlives the call and holds `prog_cnt` entries.
    a.query.__bindgen_anon_1.target_fd = cgroup.as_fd().as_raw_fd() as u32;
    a.query.attach_type = attach_type;
    a.query.prog_ids = ids.as_mut_ptr() as u64;
    a.query.__bindgen_anon_2.prog_cnt = ids.len() as u32;
    bpf(BPF_PROG_QUERY, &mut a)?;
    // SAFETY: the kernel wrote the number of programs back into the `query` member.
    let n = unsafe { a.query.__bindgen_anon_2.prog_cnt } as usize;
    ids.truncate(n.min(64));
    Ok(ids)
}
