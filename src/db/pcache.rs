//! SQLite's page cache with one needless scan taken out of every commit.
//!
//! When SQLite splits or merges B-tree pages it renumbers the new siblings so that they lie
//! in ascending order, swapping two page numbers through a spare one: the page that holds
//! the file's lock byte (page 262,145 with 4 KiB pages), which no database ever uses. The
//! default cache (`pcache1`) remembers the highest page number it has seen since its last
//! truncation, and at the end of every write transaction the pager asks it to drop every
//! page past the end of the database. Having seen the spare number, the cache takes the
//! request as covering more pages than its hash table has slots and walks the whole table
//! and every page in it, a pointer chase through all cached pages (about 4,000 with the
//! owner's 16 MiB cache, 100-900 µs) to drop nothing, at the commit of every transaction
//! that swapped two siblings.
//!
//! The wrapper installed here passes every call to SQLite's own cache and keeps, per
//! cache, an upper bound of the page numbers it holds, and whether a page is parked on the
//! spare number. A truncation that cannot drop anything (no page at or past the limit)
//! is answered here without reaching the inner cache; any other goes through unchanged.
//!
//! Invariants:
//! - `hi` is at least the number of every page in the inner cache other than the spare
//!   one: pages enter only through `xFetch` and `xRekey`, both of which raise it, and it
//!   is lowered only after a truncation that went through has dropped everything above.
//! - `spare` is true whenever a page is keyed at the spare number.
//! - The wrapper must be installed before SQLite initialises ([`install`] is called before
//!   every connection the crate opens); if SQLite was initialised first, the default cache
//!   stays in use, unwrapped, and nothing else changes.

use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;

use rusqlite::ffi;

/// The byte SQLite locks in every database file (`PENDING_BYTE`, 1 GiB); the page holding
/// it is never a database page, and is the spare number of a sibling swap.
const LOCK_BYTE: u32 = 0x4000_0000;

/// SQLite's own cache methods, wrapped by ours.
struct Inner(ffi::sqlite3_pcache_methods2);

// SAFETY: the methods are plain function pointers plus SQLite's `pArg`, which the default
// cache leaves null and SQLite itself passes to any thread; the struct is never mutated
// after it is set.
unsafe impl Send for Inner {}
unsafe impl Sync for Inner {}

static INNER: OnceLock<Inner> = OnceLock::new();

/// Truncations answered here (nothing to drop) and passed to SQLite's cache, process-wide.
static SKIPPED: AtomicU64 = AtomicU64::new(0);
static PASSED: AtomicU64 = AtomicU64::new(0);
/// Pages parked on the spare number (sibling swaps), process-wide.
static PARKED: AtomicU64 = AtomicU64::new(0);

/// Installs the wrapper once, if SQLite is not initialised yet. Returns whether it is in
/// use.
pub(super) fn install() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let mut inner = ffi::sqlite3_pcache_methods2 {
            iVersion: 0,
            pArg: std::ptr::null_mut(),
            xInit: None,
            xShutdown: None,
            xCreate: None,
            xCachesize: None,
            xPagecount: None,
            xFetch: None,
            xUnpin: None,
            xRekey: None,
            xTruncate: None,
            xDestroy: None,
            xShrink: None,
        };
        // SAFETY: `sqlite3_config` with GETPCACHE2 copies the current methods into the
        // struct it is given; it refuses (SQLITE_MISUSE) once SQLite is initialised.
        let rc = unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_GETPCACHE2, &mut inner as *mut _) };
        if rc != ffi::SQLITE_OK || inner.iVersion < 1 || !complete(&inner) {
            tracing::debug!(rc, "sqlite page cache: left as it is (sqlite already initialised)");
            return false;
        }
        if INNER.set(Inner(inner)).is_err() {
            return false;
        }
        let ours = ffi::sqlite3_pcache_methods2 {
            iVersion: 1,
            pArg: std::ptr::null_mut(),
            xInit: Some(x_init),
            xShutdown: Some(x_shutdown),
            xCreate: Some(x_create),
            xCachesize: Some(x_cachesize),
            xPagecount: Some(x_pagecount),
            xFetch: Some(x_fetch),
            xUnpin: Some(x_unpin),
            xRekey: Some(x_rekey),
            xTruncate: Some(x_truncate),
            xDestroy: Some(x_destroy),
            xShrink: Some(x_shrink),
        };
        // SAFETY: SQLite copies the struct (and `INNER` is set for the callbacks); it is
        // not initialised yet, as the call above showed.
        let rc = unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_PCACHE2, &ours as *const _) };
        rc == ffi::SQLITE_OK
    })
}

/// What the wrapper saw since the start, process-wide (read by the tests).
#[cfg(test)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Counts {
    /// Truncations answered here: there was nothing to drop.
    pub skipped: u64,
    /// Truncations passed to SQLite's cache.
    pub passed: u64,
    /// Pages parked on the spare number by a sibling swap.
    pub parked: u64,
}

#[cfg(test)]
pub(super) fn counts() -> Counts {
    Counts {
        skipped: SKIPPED.load(Ordering::Relaxed),
        passed: PASSED.load(Ordering::Relaxed),
        parked: PARKED.load(Ordering::Relaxed),
    }
}

fn complete(m: &ffi::sqlite3_pcache_methods2) -> bool {
    m.xCreate.is_some()
        && m.xCachesize.is_some()
        && m.xPagecount.is_some()
        && m.xFetch.is_some()
        && m.xUnpin.is_some()
        && m.xRekey.is_some()
        && m.xTruncate.is_some()
        && m.xDestroy.is_some()
}

fn inner() -> &'static ffi::sqlite3_pcache_methods2 {
    // Set before our methods are handed to SQLite, so every callback finds it.
    &INNER.get().expect("the page cache wrapper is installed only after its inner methods are set").0
}

/// One cache (one per connection and database); SQLite calls a cache from one connection
/// at a time, but the fields are atomics all the same.
struct Cache {
    inner: *mut ffi::sqlite3_pcache,
    /// The page number holding the lock byte for this cache's page size.
    spare_key: c_uint,
    /// At least the number of every page held, except one at `spare_key`.
    hi: AtomicU32,
    /// A page is held at `spare_key`.
    spare: AtomicBool,
}

impl Cache {
    fn note(&self, key: c_uint) {
        if key == self.spare_key {
            self.spare.store(true, Ordering::Relaxed);
        } else {
            self.hi.fetch_max(key, Ordering::Relaxed);
        }
    }

    /// Whether a truncation at `limit` (drop every page numbered `limit` or more) may find
    /// a page to drop.
    fn may_hold_from(&self, limit: c_uint) -> bool {
        self.hi.load(Ordering::Relaxed) >= limit || (self.spare.load(Ordering::Relaxed) && self.spare_key >= limit)
    }

    /// After a truncation at `limit` went through: nothing at or past it is left.
    fn truncated(&self, limit: c_uint) {
        self.hi.fetch_min(limit.saturating_sub(1), Ordering::Relaxed);
        if self.spare_key >= limit {
            self.spare.store(false, Ordering::Relaxed);
        }
    }
}

/// # Safety
/// `p` must be a cache made by [`x_create`] and not yet destroyed.
unsafe fn cache<'a>(p: *mut ffi::sqlite3_pcache) -> &'a Cache {
    unsafe { &*(p as *const Cache) }
}

unsafe extern "C" fn x_init(_arg: *mut c_void) -> c_int {
    let m = inner();
    match m.xInit {
        // SAFETY: SQLite's own method with its own argument.
        Some(f) => unsafe { f(m.pArg) },
        None => ffi::SQLITE_OK,
    }
}

unsafe extern "C" fn x_shutdown(_arg: *mut c_void) {
    let m = inner();
    if let Some(f) = m.xShutdown {
        // SAFETY: as in `x_init`.
        unsafe { f(m.pArg) }
    }
}

unsafe extern "C" fn x_create(sz_page: c_int, sz_extra: c_int, purgeable: c_int) -> *mut ffi::sqlite3_pcache {
    let create = inner().xCreate.expect("checked at install");
    // SAFETY: SQLite's own method, called with the arguments SQLite gave us.
    let p = unsafe { create(sz_page, sz_extra, purgeable) };
    if p.is_null() {
        return p;
    }
    let spare_key = if sz_page > 0 { LOCK_BYTE / sz_page as u32 + 1 } else { c_uint::MAX };
    let cache = Box::new(Cache { inner: p, spare_key, hi: AtomicU32::new(0), spare: AtomicBool::new(false) });
    Box::into_raw(cache) as *mut ffi::sqlite3_pcache
}

unsafe extern "C" fn x_cachesize(p: *mut ffi::sqlite3_pcache, n: c_int) {
    // SAFETY: `p` is ours (SQLite hands back what `x_create` returned); the inner cache is
    // live until `x_destroy`.
    unsafe { inner().xCachesize.expect("checked at install")(cache(p).inner, n) }
}

unsafe extern "C" fn x_pagecount(p: *mut ffi::sqlite3_pcache) -> c_int {
    // SAFETY: as in `x_cachesize`.
    unsafe { inner().xPagecount.expect("checked at install")(cache(p).inner) }
}

unsafe extern "C" fn x_fetch(p: *mut ffi::sqlite3_pcache, key: c_uint, create: c_int) -> *mut ffi::sqlite3_pcache_page {
    // SAFETY: as in `x_cachesize`.
    let c = unsafe { cache(p) };
    let page = unsafe { inner().xFetch.expect("checked at install")(c.inner, key, create) };
    if !page.is_null() {
        c.note(key);
    }
    page
}

unsafe extern "C" fn x_unpin(p: *mut ffi::sqlite3_pcache, page: *mut ffi::sqlite3_pcache_page, discard: c_int) {
    // SAFETY: as in `x_cachesize`; `page` came from this cache's `x_fetch`.
    unsafe { inner().xUnpin.expect("checked at install")(cache(p).inner, page, discard) }
}

unsafe extern "C" fn x_rekey(
    p: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    old: c_uint,
    new: c_uint,
) {
    // SAFETY: as in `x_unpin`.
    let c = unsafe { cache(p) };
    unsafe { inner().xRekey.expect("checked at install")(c.inner, page, old, new) };
    if old == c.spare_key {
        c.spare.store(false, Ordering::Relaxed);
    }
    if new == c.spare_key {
        PARKED.fetch_add(1, Ordering::Relaxed);
    }
    c.note(new);
}

unsafe extern "C" fn x_truncate(p: *mut ffi::sqlite3_pcache, limit: c_uint) {
    // SAFETY: as in `x_cachesize`.
    let c = unsafe { cache(p) };
    if !c.may_hold_from(limit) {
        SKIPPED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    PASSED.fetch_add(1, Ordering::Relaxed);
    unsafe { inner().xTruncate.expect("checked at install")(c.inner, limit) };
    c.truncated(limit);
}

unsafe extern "C" fn x_destroy(p: *mut ffi::sqlite3_pcache) {
    // SAFETY: `p` is ours and SQLite never uses it again after this call, so the box is
    // taken back exactly once.
    let c = unsafe { Box::from_raw(p as *mut Cache) };
    unsafe { inner().xDestroy.expect("checked at install")(c.inner) };
}

unsafe extern "C" fn x_shrink(p: *mut ffi::sqlite3_pcache) {
    if let Some(f) = inner().xShrink {
        // SAFETY: as in `x_cachesize`.
        unsafe { f(cache(p).inner) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache_of(spare_key: c_uint) -> Cache {
        Cache { inner: std::ptr::null_mut(), spare_key, hi: 0.into(), spare: false.into() }
    }

    #[test]
    fn a_truncation_past_every_page_held_is_known_to_drop_nothing() {
        let c = cache_of(262_145);
        assert!(!c.may_hold_from(1), "an empty cache holds nothing");
        c.note(10);
        c.note(7);
        assert!(c.may_hold_from(10) && c.may_hold_from(1));
        assert!(!c.may_hold_from(11));
        // A sibling swap parks page 7 on the spare number and back.
        c.note(262_145);
        assert!(c.may_hold_from(11), "the parked page lies past the limit");
        c.spare.store(false, Ordering::Relaxed);
        c.note(9);
        assert!(!c.may_hold_from(11), "once back, nothing is past page 10");
    }

    #[test]
    fn a_truncation_that_went_through_lowers_the_bound() {
        let c = cache_of(262_145);
        c.note(50);
        c.note(262_145);
        c.truncated(21);
        assert!(!c.may_hold_from(21), "pages 21 and up, the parked one included, are gone");
        assert!(c.may_hold_from(20));
        c.truncated(1);
        assert!(!c.may_hold_from(1));
    }
}
