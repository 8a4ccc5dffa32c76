//! The PAM session of a desktop: a small root helper between the agent and the session.
//!
//! When the agent runs as root it does not start the session command itself but
//! `vsmagent --session-helper SERVICE USER -- COMMAND...` ([`helper_argv`]). That process
//! (still root, alone in the session's new Unix session) opens a PAM session for the user
//! with service `SERVICE` (`/etc/pam.d/vsm` by default: limits, environment, logind through
//! `pam_systemd`, home mounts), forks, drops to the user in the child (supplementary groups,
//! gid, uid) and runs the command there with the PAM environment added; when the command
//! ends, it closes the PAM session and exits with the command's status. Signals it receives
//! (TERM, HUP, INT) go on to the command, so terminating the session still ends it through
//! this process.
//!
//! libpam is loaded at run time (`dlopen("libpam.so.0")`), so building vsm needs no PAM
//! headers and a machine without libpam fails one session start with a clear message, not the
//! agent.
//!
//! Invariants: the helper never runs the command as root when a user was named; it never
//! prompts (the user authenticated with SSH already: a module that asks gets an error); it
//! refuses a PAM service whose file does not exist rather than fall back to `other`.

use std::ffi::{c_char, c_int, c_void, CStr, CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

/// The first argument that turns `vsmagent` into the helper.
pub const HELPER_FLAG: &str = "--session-helper";

/// argv of the helper running `command` for `user` with PAM service `service`.
pub fn helper_argv(helper: &Path, service: &str, user: &str, command: &[String]) -> Vec<String> {
    let mut v = vec![helper.display().to_string(), HELPER_FLAG.into(), service.into(), user.into(), "--".into()];
    v.extend(command.iter().cloned());
    v
}

/// Does a PAM service file exist for `service`?
pub fn service_exists(service: &str) -> bool {
    !service.is_empty()
        && !service.contains('/')
        && ["/etc/pam.d", "/usr/lib/pam.d"].iter().any(|d| Path::new(d).join(service).is_file())
}

const PAM_SUCCESS: c_int = 0;
const PAM_TTY: c_int = 3;
const PAM_ESTABLISH_CRED: c_int = 0x0002;
const PAM_DELETE_CRED: c_int = 0x0004;
const PAM_CONV_ERR: c_int = 19;

#[repr(C)]
struct PamConv {
    conv: extern "C" fn(c_int, *mut *const c_void, *mut *mut c_void, *mut c_void) -> c_int,
    appdata: *mut c_void,
}

/// Nobody answers questions here: the user authenticated with SSH before.
extern "C" fn no_conversation(
    _n: c_int,
    _msg: *mut *const c_void,
    _resp: *mut *mut c_void,
    _data: *mut c_void,
) -> c_int {
    PAM_CONV_ERR
}

type StartFn = unsafe extern "C" fn(*const c_char, *const c_char, *const PamConv, *mut *mut c_void) -> c_int;
type HandleFlagsFn = unsafe extern "C" fn(*mut c_void, c_int) -> c_int;
type SetItemFn = unsafe extern "C" fn(*mut c_void, c_int, *const c_void) -> c_int;
type GetEnvListFn = unsafe extern "C" fn(*mut c_void) -> *mut *mut c_char;
type StrErrorFn = unsafe extern "C" fn(*mut c_void, c_int) -> *const c_char;

struct Pam {
    handle: *mut c_void,
    end: HandleFlagsFn,
    setcred: HandleFlagsFn,
    close_session: HandleFlagsFn,
    open_session: HandleFlagsFn,
    set_item: SetItemFn,
    getenvlist: GetEnvListFn,
    strerror: StrErrorFn,
}

fn sym<T: Copy>(lib: *mut c_void, name: &CStr) -> Result<T, String> {
    // SAFETY: dlsym on a handle from dlopen with a NUL-terminated name; the pointer is only
    // transmuted to the function type libpam documents for that name.
    let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
    if p.is_null() {
        return Err(format!("libpam has no {}", name.to_string_lossy()));
    }
    debug_assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: see above; T is a function pointer type of pointer size.
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
}

impl Pam {
    fn start(service: &str, user: &str, tty: Option<&str>) -> Result<Pam, String> {
        // SAFETY: dlopen with a constant NUL-terminated name.
        let lib = unsafe { libc::dlopen(c"libpam.so.0".as_ptr(), libc::RTLD_NOW) };
        if lib.is_null() {
            return Err("cannot load libpam.so.0 (is libpam0g installed?)".into());
        }
        let start: StartFn = sym(lib, c"pam_start")?;
        let mut pam = Pam {
            handle: std::ptr::null_mut(),
            end: sym(lib, c"pam_end")?,
            setcred: sym(lib, c"pam_setcred")?,
            close_session: sym(lib, c"pam_close_session")?,
            open_session: sym(lib, c"pam_open_session")?,
            set_item: sym(lib, c"pam_set_item")?,
            getenvlist: sym(lib, c"pam_getenvlist")?,
            strerror: sym(lib, c"pam_strerror")?,
        };
        let service_c = CString::new(service).map_err(|_| "the PAM service name holds a NUL byte".to_string())?;
        let user_c = CString::new(user).map_err(|_| "the user name holds a NUL byte".to_string())?;
        // libpam keeps the pointer for the life of the handle: leak it on purpose (one per
        // helper process).
        let conv: &'static PamConv =
            Box::leak(Box::new(PamConv { conv: no_conversation, appdata: std::ptr::null_mut() }));
        // SAFETY: valid C strings and conversation; the handle is written by pam_start.
        let rc = unsafe { start(service_c.as_ptr(), user_c.as_ptr(), conv, &mut pam.handle) };
        if rc != PAM_SUCCESS || pam.handle.is_null() {
            return Err(format!("pam_start({service}, {user}) failed with code {rc}"));
        }
        if let Some(tty) = tty.and_then(|t| CString::new(t).ok()) {
            // SAFETY: PAM_TTY takes a C string, copied by libpam.
            unsafe { (pam.set_item)(pam.handle, PAM_TTY, tty.as_ptr().cast()) };
        }
        Ok(pam)
    }

    fn error(&self, rc: c_int) -> String {
        // SAFETY: pam_strerror returns a static string for any code.
        let s = unsafe { (self.strerror)(self.handle, rc) };
        if s.is_null() {
            format!("PAM error {rc}")
        } else {
            // SAFETY: non-null, NUL-terminated, owned by libpam.
            unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
        }
    }

    /// The environment the modules set (`NAME=value` each).
    fn env(&self) -> Vec<CString> {
        // SAFETY: pam_getenvlist returns a NULL-terminated malloc'ed array of malloc'ed
        // strings (or NULL); each is copied, then freed.
        unsafe {
            let list = (self.getenvlist)(self.handle);
            if list.is_null() {
                return Vec::new();
            }
            let mut out = Vec::new();
            let mut i = 0;
            loop {
                let p = *list.add(i);
                if p.is_null() {
                    break;
                }
                out.push(CStr::from_ptr(p).to_owned());
                libc::free(p.cast());
                i += 1;
            }
            libc::free(list.cast());
            out
        }
    }
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

fn say(msg: &str) {
    eprintln!("vsmagent session helper: {msg}");
}

/// `vsmagent --session-helper SERVICE USER -- COMMAND...`: returns the exit status.
pub fn helper_main(args: &[OsString]) -> i32 {
    if args.len() < 4 || args[2] != "--" {
        say("usage: vsmagent --session-helper SERVICE USER -- COMMAND [ARG...]");
        return 2;
    }
    let service = args[0].to_string_lossy().into_owned();
    let user = args[1].to_string_lossy().into_owned();
    let command: Vec<CString> = match args[3..].iter().map(|a| CString::new(a.as_bytes())).collect() {
        Ok(c) => c,
        Err(_) => {
            say("the command holds a NUL byte");
            return 2;
        }
    };
    if !service_exists(&service) {
        say(&format!(
            "PAM service {service:?} has no file in /etc/pam.d: install the vsm package's /etc/pam.d/{service}, or set /vsmagent/pam_service to another service"
        ));
        return 1;
    }
    let u = match nix::unistd::User::from_name(&user) {
        Ok(Some(u)) => u,
        _ => {
            say(&format!("unknown user {user:?}"));
            return 1;
        }
    };
    let Ok(cname) = CString::new(u.name.as_bytes()) else { return 1 };
    let groups = match nix::unistd::getgrouplist(&cname, u.gid) {
        Ok(g) => g,
        Err(e) => {
            say(&format!("cannot list the groups of {user}: {e}"));
            return 1;
        }
    };
    let tty = std::env::var("DISPLAY").ok();
    let pam = match Pam::start(&service, &user, tty.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            say(&e);
            return 1;
        }
    };
    // SAFETY: handle from pam_start.
    let rc = unsafe { (pam.setcred)(pam.handle, PAM_ESTABLISH_CRED) };
    if rc != PAM_SUCCESS {
        say(&format!("pam_setcred: {} (going on without credentials)", pam.error(rc)));
    }
    // SAFETY: as above.
    let rc = unsafe { (pam.open_session)(pam.handle, 0) };
    if rc != PAM_SUCCESS {
        say(&format!("cannot open a PAM session for {user} with service {service}: {}", pam.error(rc)));
        // SAFETY: as above.
        unsafe { (pam.end)(pam.handle, rc) };
        return 1;
    }
    let mut env: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut b = k.as_bytes().to_vec();
            b.push(b'=');
            b.extend_from_slice(v.as_bytes());
            CString::new(b).ok()
        })
        .collect();
    for e in pam.env() {
        let name = e.as_bytes().split(|&b| b == b'=').next().unwrap_or_default().to_vec();
        env.retain(|x| x.as_bytes().split(|&b| b == b'=').next() != Some(&name[..]));
        env.push(e);
    }
    let home = CString::new(u.dir.as_os_str().as_bytes()).unwrap_or_else(|_| CString::from(c"/"));

    // SAFETY: this process is single-threaded (the helper runs before any runtime starts),
    // so the child may run ordinary code until exec.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            let fail = |what: &str, e: nix::Error| -> ! {
                say(&format!("{what}: {e}"));
                // SAFETY: leave the child without running the parent's destructors.
                unsafe { libc::_exit(127) }
            };
            if let Err(e) = nix::unistd::setgroups(&groups) {
                fail("setgroups", e);
            }
            if let Err(e) = nix::unistd::setgid(u.gid) {
                fail("setgid", e);
            }
            if let Err(e) = nix::unistd::setuid(u.uid) {
                fail("setuid", e);
            }
            // SAFETY: chdir with a C string; a home that cannot be entered leaves "/".
            if unsafe { libc::chdir(home.as_ptr()) } != 0 {
                let _ = nix::unistd::chdir("/");
            }
            let e = nix::unistd::execvpe(&command[0], &command, &env).unwrap_err();
            fail(&format!("cannot run {}", command[0].to_string_lossy()), e)
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            CHILD.store(child.as_raw(), Ordering::SeqCst);
            for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
                // SAFETY: installing a handler that only calls kill.
                unsafe { libc::signal(sig, forward as *const () as libc::sighandler_t) };
            }
            let status = loop {
                match nix::sys::wait::waitpid(child, None) {
                    Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => break code,
                    Ok(nix::sys::wait::WaitStatus::Signaled(_, sig, _)) => break 128 + sig as i32,
                    Ok(_) | Err(nix::Error::EINTR) => continue,
                    Err(e) => {
                        say(&format!("waiting for the session failed: {e}"));
                        break 1;
                    }
                }
            };
            // SAFETY: handle from pam_start, session opened above.
            unsafe {
                let rc = (pam.close_session)(pam.handle, 0);
                if rc != PAM_SUCCESS {
                    say(&format!("closing the PAM session: {}", pam.error(rc)));
                }
                (pam.setcred)(pam.handle, PAM_DELETE_CRED);
                (pam.end)(pam.handle, PAM_SUCCESS);
            }
            status
        }
        Err(e) => {
            say(&format!("fork: {e}"));
            // SAFETY: as above.
            unsafe {
                (pam.close_session)(pam.handle, 0);
                (pam.end)(pam.handle, PAM_SUCCESS);
            }
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_argv_keeps_the_command_as_separate_arguments() {
        let v = helper_argv(Path::new("/usr/sbin/vsmagent"), "vsm", "alice", &["Xvnc".into(), ":10; rm -rf /".into()]);
        assert_eq!(v, ["/usr/sbin/vsmagent", HELPER_FLAG, "vsm", "alice", "--", "Xvnc", ":10; rm -rf /"]);
    }

    #[test]
    fn service_names_are_files_in_pam_d_only() {
        assert!(!service_exists(""));
        assert!(!service_exists("../passwd"));
        assert!(!service_exists("no-such-service-for-vsm-tests"));
    }

    #[test]
    fn bad_helper_arguments_are_refused() {
        assert_eq!(helper_main(&[OsString::from("vsm")]), 2);
        let args: Vec<OsString> = ["vsm", "alice", "x", "true"].iter().map(OsString::from).collect();
        assert_eq!(helper_main(&args), 2);
        let args: Vec<OsString> =
            ["no-such-service-for-vsm-tests", "alice", "--", "true"].iter().map(OsString::from).collect();
        assert_eq!(helper_main(&args), 1);
    }
}
