//! Clones are forked from a resident template holder, so their memory is
//! anonymous memory shared copy-on-write with it: memory an allocator gives
//! back (MADV_DONTNEED, MADV_FREE, malloc_trim, jemalloc's purge) behaves
//! as in the original, which allocators that trust purged memory to read
//! as zero depend on. The holder is listed and removed by name, and clones
//! outlive it.

mod common;

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::Path;

use common::{alive, pid_of, redis_cli, start_redis, Harness};

/// One connection to clonemem (`tests/programs/clonemem.c`) on port 9000
/// under `aid`: sends `request`, returns the answer line.
fn ask(h: &Harness, aid: &str, request: &str) -> String {
    let script = "import socket, sys\n\
s = socket.create_connection(('127.0.0.1', 9000), timeout=30)\n\
s.sendall(sys.argv[1].encode())\n\
s.shutdown(socket.SHUT_WR)\n\
print(s.makefile().read(), end='')\n";
    let ran = h.client(aid, &["python3", "-c", script, request]);
    assert!(ran.success(), "clonemem {request:?} under {aid}: {ran}");
    ran.stdout.trim_end().to_string()
}

/// A digest of a file's bytes.
fn digest(path: &Path) -> u64 {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

/// clonemem with `mib` MiB as instance `name`, snapshotted as a template
/// (and stopped) to `image`.
fn clonemem_template(h: &mut Harness, name: &str, mib: &str, image: &Path) {
    let bin = h.compile("clonemem.c", "clonemem");
    let dir = h.dir(name);
    let bin = bin.to_str().expect("utf-8 path");
    h.start(name, name, &dir, &[], &[bin, "9000", mib]);
    h.wait_log(name, "clonemem listening on port 9000");
    assert_eq!(ask(h, name, "pattern"), "ok");
    let ran = h.snapshot(name, image, &["--template"]);
    assert!(ran.success(), "appshot snapshot {name} --template: {ran}");
}

/// `appshot templates` as rows of columns, without the header.
fn templates(h: &Harness) -> Vec<Vec<String>> {
    let mut cmd = h.appshot();
    cmd.arg("templates");
    let ran = common::run(&mut cmd, std::time::Duration::from_secs(30));
    assert!(ran.success(), "appshot templates: {ran}");
    ran.stdout
        .lines()
        .skip(1)
        .map(|l| {
            // RSS and PSS are "N MiB": one column each.
            let words: Vec<&str> = l.split_whitespace().collect();
            let mut cols: Vec<String> = words[..3].iter().map(|w| w.to_string()).collect();
            cols.extend(words[3..7].chunks(2).map(|c| c.join(" ")));
            cols.extend(words[7..].iter().map(|w| w.to_string()));
            cols
        })
        .collect()
}

#[test]
fn purged_memory_of_each_clone_reads_zeros_and_the_rest_keeps_the_template() {
    let Some(mut h) = Harness::new(
        "purged_memory_of_each_clone_reads_zeros_and_the_rest_keeps_the_template",
        &["gcc", "python3"],
    ) else {
        return;
    };
    let image = h.dir("images").join("clonemem.img");
    clonemem_template(&mut h, "cm-t", "64", &image);
    let before = digest(&image);
    let names: Vec<String> = (1..=3).map(|i| format!("cm-{i}")).collect();
    h.clone_template(&names, &image, &["--aid", "cm", "--count", "3"]);
    // Each clone purges in turn; the first-half check of a later one sees
    // that an earlier one's purge stayed in that clone.
    for name in &names {
        assert_eq!(ask(&h, name, "purge"), "ok", "{name}");
    }
    for name in &names {
        assert_eq!(
            ask(&h, name, "pattern"),
            "FAIL: region",
            "{name}: its purged half reads zeros from now on"
        );
    }
    let listed = templates(&h);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0][0], "clonemem.img", "{listed:?}");
    assert_eq!(listed[0][1], image.to_str().expect("utf-8"), "{listed:?}");
    assert_eq!(listed[0][5], "3", "clones started: {listed:?}");
    let holder = h.holder_pid("clonemem.img");
    assert_eq!(listed[0][2], holder.to_string(), "{listed:?}");
    assert_eq!(
        fs::read_to_string(format!("/proc/{holder}/comm"))
            .unwrap_or_default()
            .trim(),
        "appshot-tmpl"
    );
    assert_eq!(digest(&image), before, "the template's image is untouched");
}

#[test]
fn clones_answer_on_after_their_template_is_removed() {
    let Some(mut h) = Harness::new(
        "clones_answer_on_after_their_template_is_removed",
        &["gcc", "python3"],
    ) else {
        return;
    };
    let image = h.dir("images").join("tm.img");
    clonemem_template(&mut h, "rm-t", "16", &image);
    let names: Vec<String> = (1..=2).map(|i| format!("rm-{i}")).collect();
    h.clone_template(&names, &image, &["--aid", "rm", "--count", "2"]);
    let holder = h.holder_pid("tm.img");
    assert!(alive(holder));

    let mut cmd = h.appshot();
    cmd.args(["template", "rm", "tm.img"]);
    let ran = common::run(&mut cmd, std::time::Duration::from_secs(30));
    assert!(ran.success(), "appshot template rm: {ran}");
    assert!(!alive(holder), "the holder {holder} is gone");
    assert!(templates(&h).is_empty(), "{:?}", templates(&h));
    for name in &names {
        assert_eq!(ask(&h, name, "pattern"), "ok", "{name} after template rm");
        assert_eq!(ask(&h, name, "purge"), "ok", "{name} after template rm");
        let row = h.instance(name).expect("listed");
        assert!(alive(pid_of(&row)));
    }

    // The next clone starts a holder again.
    h.clone_template(&["rm-3".to_string()], &image, &["--aid", "rm-3"]);
    assert_ne!(h.holder_pid("tm.img"), holder);
    assert_eq!(ask(&h, "rm-3", "purge"), "ok");

    let mut cmd = h.appshot();
    cmd.args(["template", "rm", "no-such.img"]);
    let ran = common::run(&mut cmd, std::time::Duration::from_secs(30));
    assert!(
        !ran.success() && ran.stderr.contains("no template named `no-such.img`"),
        "{ran}"
    );
}

/// The value `DEBUG POPULATE … key 64` gives key:N: "value:N", padded with
/// NUL bytes to 64.
const CHECK_KEYS: &str = "\
local bad = 0\n\
for i = tonumber(ARGV[1]), 199999 do\n\
  local v = redis.call('GET', 'key:' .. i)\n\
  local want = 'value:' .. i\n\
  if not v or #v ~= 64 or string.sub(v, 1, #want) ~= want then bad = bad + 1 end\n\
end\n\
for i = 0, 99999 do\n\
  if redis.call('GET', 'new:' .. i) ~= ARGV[2] .. ':' .. i then bad = bad + 1 end\n\
end\n\
return bad";

#[test]
fn ten_redis_clones_purge_their_memory_and_keep_every_key() {
    let Some(mut h) = Harness::new(
        "ten_redis_clones_purge_their_memory_and_keep_every_key",
        &["redis-server", "redis-cli"],
    ) else {
        return;
    };
    start_redis(&mut h, "redis-t", "rt", &["--enable-debug-command", "yes"]);
    assert_eq!(
        redis_cli(&h, "rt", &["DEBUG", "POPULATE", "200000", "key", "64"]),
        "OK"
    );
    let image = h.dir("images").join("redis.img");
    let ran = h.snapshot("redis-t", &image, &["--template"]);
    assert!(ran.success(), "appshot snapshot --template: {ran}");
    let before = digest(&image);

    let names: Vec<String> = (1..=10).map(|i| format!("rp-{i}")).collect();
    h.clone_template(&names, &image, &["--aid", "rp", "--count", "10"]);
    for name in &names {
        assert_eq!(redis_cli(&h, name, &["DBSIZE"]), "200000", "{name}");
        let deleted = redis_cli(
            &h,
            name,
            &[
                "EVAL",
                "for i = 0, 179999 do redis.call('DEL', 'key:' .. i) end return 1",
                "0",
            ],
        );
        assert_eq!(deleted, "1", "{name}");
        assert_eq!(redis_cli(&h, name, &["MEMORY", "PURGE"]), "OK", "{name}");
        let written = redis_cli(
            &h,
            name,
            &[
                "EVAL",
                "for i = 0, 99999 do redis.call('SET', 'new:' .. i, ARGV[1] .. ':' .. i) end return 1",
                "0",
                name,
            ],
        );
        assert_eq!(written, "1", "{name}");
        assert_eq!(
            redis_cli(&h, name, &["EVAL", CHECK_KEYS, "0", "180000", name]),
            "0",
            "{name}: keys that read back wrong"
        );
        assert_eq!(redis_cli(&h, name, &["DBSIZE"]), "120000", "{name}");
    }
    // Every clone's work stayed its own: each still holds exactly its keys.
    for name in &names {
        assert_eq!(
            redis_cli(&h, name, &["EVAL", CHECK_KEYS, "0", "180000", name]),
            "0",
            "{name}: keys that read back wrong after the other clones' work"
        );
    }
    assert_eq!(digest(&image), before, "the template's image is untouched");
}

/// A `smaps_rollup` field of process `pid`, in KiB.
fn rollup_kib(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/smaps_rollup"))
}

/// 100 clones of a 256 MiB template run at once, each answering under its
/// own AID from its own UTS namespace, and together they take less memory
/// (PSS) than the holder's resident template plus what they wrote
/// (their private pages): the template's pages are shared, not copied.
#[test]
fn a_hundred_clones_of_a_256_mib_template_share_its_memory() {
    let Some(mut h) = Harness::new(
        "a_hundred_clones_of_a_256_mib_template_share_its_memory",
        &["gcc", "python3"],
    ) else {
        return;
    };
    let image = h.dir("images").join("hundred.img");
    clonemem_template(&mut h, "hd-t", "256", &image);
    let names: Vec<String> = (1..=100).map(|i| format!("hd-{i}")).collect();
    h.clone_template(&names, &image, &["--aid", "hd", "--count", "100"]);
    for name in &names {
        assert_eq!(ask(&h, name, "host"), *name, "{name} answers its own AID");
    }
    let rows = h.ps();
    let pids: Vec<u32> = names
        .iter()
        .map(|n| pid_of(rows.iter().find(|r| r["name"] == *n).expect("listed")))
        .collect();
    let holder = h.holder_pid("hundred.img");
    let template_rss = rollup_kib(holder, "Rss:");
    assert!(template_rss >= 256 * 1024, "holder RSS {template_rss} KiB");
    let pss: u64 = pids.iter().map(|&p| rollup_kib(p, "Pss:")).sum();
    let written: u64 = pids
        .iter()
        .map(|&p| rollup_kib(p, "Private_Dirty:") + rollup_kib(p, "Private_Clean:"))
        .sum();
    println!(
        "100 clones: PSS {pss} KiB in all, private {written} KiB in all; holder RSS {template_rss} KiB"
    );
    assert!(
        pss <= template_rss + written,
        "the clones' PSS {pss} KiB exceeds the template's RSS {template_rss} KiB plus their private {written} KiB"
    );
    // Each clone's own pages are few: the template is not copied into any.
    assert!(
        written < 100 * 8 * 1024,
        "the clones hold {written} KiB of private memory"
    );
}
