//! `appshot snapshot --template` and `appshot clone`: every clone of a
//! template is an instance of its own (AID, name, real ports, PID
//! namespace) that starts with the template's state, shares the template's
//! unchanged memory with the other clones, and sees its own identity file;
//! a clone that cannot succeed is refused, with a message saying why,
//! before any clone starts.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::{
    alive, assert_left_nothing, info_field, keeper, keeper_copy, pid_of, pids_with_arg, poll,
    port_pairs, query_keeper, redis_cli, script, start_keeper, start_redis, status_field,
    uncaptured, Harness, Ran, SignalState,
};
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// The real ports `appshot clone` hands out (the default range).
const RANGE: std::ops::RangeInclusive<u64> = 20000..=29999;

/// The instance names `appshot clone --count COUNT` gives: BASE-1 … BASE-N.
fn numbered(base: &str, count: u32) -> Vec<String> {
    (1..=count).map(|i| format!("{base}-{i}")).collect()
}

/// (Rss, Pss) of `pid` in bytes, from /proc/PID/smaps_rollup.
fn rss_pss(pid: u32) -> (u64, u64) {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{path} without {key}:\n{text}"))
            * 1024
    };
    (field("Rss"), field("Pss"))
}

/// The `ps --json` rows of `names`, in that order; each must be listed once.
fn rows_of(h: &Harness, names: &[String]) -> Vec<Value> {
    let ps = h.ps();
    names
        .iter()
        .map(|n| {
            let rows: Vec<&Value> = ps.iter().filter(|r| r["name"] == n.as_str()).collect();
            assert_eq!(rows.len(), 1, "{n} listed once: {ps:#?}");
            rows[0].clone()
        })
        .collect()
}

/// Each clone (`rows`, with `aids`): its own AID, only translations of
/// `virtual_port`, with real ports that no other listed instance (a running
/// template included) has.
fn assert_own_ports(h: &Harness, rows: &[Value], aids: &[String], virtual_port: u16) {
    let mut reals = BTreeSet::new();
    for row in h.ps() {
        if !rows.iter().any(|r| r["name"] == row["name"]) {
            reals.extend(port_pairs(&row).iter().map(|p| p.real));
        }
    }
    for (row, aid) in rows.iter().zip(aids) {
        assert_eq!(row["aid"], aid.as_str(), "{row}");
        let pairs = port_pairs(row);
        assert!(!pairs.is_empty(), "a clone listens: {row}");
        for p in pairs {
            assert_eq!(p.virtual_port, virtual_port, "{row}");
            assert!(
                reals.insert(p.real),
                "real port {} of {} is another instance's too: {:#?}",
                p.real,
                row["name"],
                h.ps()
            );
        }
        let name = row["name"].as_str().expect("name");
        let translations = h.translations(name);
        assert!(
            !translations.is_empty() && translations.iter().all(|t| t["aid"] == aid.as_str()),
            "translations of {name} are registered under {aid}: {translations:#?}"
        );
    }
}

/// A refused clone: fails, its message contains every one of `says`, it
/// leaves nothing behind ([`common::assert_left_nothing`]), and none of
/// `names` has a log: the refusal came before any supervisor started.
fn assert_clone_refused(
    h: &Harness,
    ran: &Ran,
    names: &[String],
    says: &[&str],
    marker: &str,
    processes: &BTreeSet<u32>,
) {
    assert!(!ran.success(), "clone as {names:?} must be refused: {ran}");
    for s in says {
        assert!(
            ran.stderr.contains(s),
            "clone as {names:?}: the message must say {s:?}: {ran}"
        );
    }
    assert_left_nothing(h, "clone", names, marker, processes);
    for name in names {
        assert!(
            !h.log_path(name).exists(),
            "refused clone started a supervisor for {name}: its log {} exists:\n{}",
            h.log_path(name).display(),
            h.log(name)
        );
    }
}

/// `appshot snapshot NAME --template -o IMAGE FLAGS`, asserted to succeed.
fn template(h: &Harness, name: &str, image: &Path, flags: &[&str]) -> Ran {
    let mut all = vec!["--template"];
    all.extend_from_slice(flags);
    let ran = h.snapshot(name, image, &all);
    assert!(ran.success(), "appshot snapshot {name} {all:?}: {ran}");
    ran
}

#[test]
fn ten_redis_clones_share_the_template_memory_and_keep_their_writes_apart() {
    let Some(mut h) = Harness::new(
        "ten_redis_clones_share_the_template_memory_and_keep_their_writes_apart",
        &["redis-server", "redis-cli"],
    ) else {
        return;
    };
    start_redis(&mut h, "redis-t", "rt", &["--enable-debug-command", "yes"]);
    // 200 000 values of 1 KiB: keys key:0 … key:199999.
    assert_eq!(
        redis_cli(&h, "rt", &["DEBUG", "POPULATE", "200000", "key", "1024"]),
        "OK"
    );
    assert_eq!(
        redis_cli(&h, "rt", &["SET", "marker", "from-template"]),
        "OK"
    );
    let used: u64 = info_field(&redis_cli(&h, "rt", &["INFO", "memory"]), "used_memory")
        .parse()
        .expect("used_memory");
    assert!(
        used >= 200 * MIB,
        "the template holds at least 200 MiB of data: used_memory {} MiB",
        used / MIB
    );
    let value = redis_cli(&h, "rt", &["GET", "key:123"]);
    assert!(value.starts_with("value:123"), "GET key:123: {value:?}");
    let digest = redis_cli(&h, "rt", &["DEBUG", "DIGEST"]);
    let server = redis_cli(&h, "rt", &["INFO", "server"]);
    let template_pid = info_field(&server, "process_id");
    let template_row = h.instance("redis-t").expect("redis-t listed");
    let (template_rss, template_pss) = rss_pss(pid_of(&template_row));

    // Left running: the original is checked for isolation too.
    let image = h.dir("images").join("redis.img");
    let ran = template(&h, "redis-t", &image, &["--leave-running"]);
    assert!(ran.stdout.contains("left running"), "{ran}");

    let names = numbered("rc", 10);
    h.clone_template(&names, &image, &["--aid", "rc", "--count", "10"]);
    let rows = rows_of(&h, &names);
    // Names default to the AID: rc-i is the name and the AID of clone i.
    assert_own_ports(&h, &rows, &names, 6379);

    for aid in &names {
        assert_eq!(
            redis_cli(&h, aid, &["GET", "marker"]),
            "from-template",
            "{aid}"
        );
        assert_eq!(redis_cli(&h, aid, &["GET", "key:123"]), value, "{aid}");
        let server = redis_cli(&h, aid, &["INFO", "server"]);
        assert_eq!(
            info_field(&server, "process_id"),
            template_pid,
            "{aid}: a clone runs with the template's PID in a namespace of its own"
        );
        // Reads every key and value: the clone holds the whole data set
        // (and has all of it resident for the measurement below).
        assert_eq!(
            redis_cli(&h, aid, &["DEBUG", "DIGEST"]),
            digest,
            "{aid}: the clone's data set differs from the template's"
        );
    }
    let refused = h.client("rc", &["redis-cli", "-p", "6379", "PING"]);
    assert!(
        !refused.stdout.contains("PONG")
            && format!("{}{}", refused.stdout, refused.stderr).contains("refused"),
        "AID rc has no instance (its clones are rc-1 … rc-10): {refused}"
    );

    let mut total_pss = 0;
    let mut per_clone = Vec::new();
    for row in &rows {
        let (rss, pss) = rss_pss(pid_of(row));
        per_clone.push(format!(
            "{}: Rss {} MiB Pss {} MiB",
            row["name"].as_str().unwrap_or("?"),
            rss / MIB,
            pss / MIB
        ));
        // Otherwise the PSS sum says nothing about sharing.
        assert!(
            rss * 4 >= template_rss * 3,
            "{}: after DEBUG DIGEST a clone has the data set resident: Rss {} MiB, template Rss {} MiB",
            row["name"],
            rss / MIB,
            template_rss / MIB
        );
        total_pss += pss;
    }
    let limit = 10 * template_rss / 2;
    uncaptured(&format!(
        "redis template: used_memory {} MiB, Rss {} MiB, Pss {} MiB; ten clones: total Pss {} MiB \
         (limit {} MiB = 0.5 x 10 x template Rss; unshared would be ~{} MiB)\n  {}",
        used / MIB,
        template_rss / MIB,
        template_pss / MIB,
        total_pss / MIB,
        limit / MIB,
        10 * template_rss / MIB,
        per_clone.join("\n  ")
    ));
    assert!(
        total_pss < limit,
        "ten clones must share the template's pages: total Pss {} MiB, limit {} MiB (template Rss {} MiB):\n  {}",
        total_pss / MIB,
        limit / MIB,
        template_rss / MIB,
        per_clone.join("\n  ")
    );

    // Writes stay in the clone (or original) that made them.
    assert_eq!(redis_cli(&h, "rc-1", &["SET", "only-rc-1", "1"]), "OK");
    assert_eq!(redis_cli(&h, "rt", &["SET", "only-template", "1"]), "OK");
    assert_eq!(redis_cli(&h, "rc-1", &["EXISTS", "only-rc-1"]), "1");
    assert_eq!(redis_cli(&h, "rc-2", &["EXISTS", "only-rc-1"]), "0");
    assert_eq!(redis_cli(&h, "rc-10", &["EXISTS", "only-rc-1"]), "0");
    assert_eq!(redis_cli(&h, "rt", &["EXISTS", "only-rc-1"]), "0");
    assert_eq!(redis_cli(&h, "rc-1", &["EXISTS", "only-template"]), "0");
    assert_eq!(redis_cli(&h, "rc-2", &["DBSIZE"]), "200001");
    assert_eq!(redis_cli(&h, "rc-1", &["DBSIZE"]), "200002");
    assert_eq!(redis_cli(&h, "rt", &["DBSIZE"]), "200002");
    assert_eq!(redis_cli(&h, "rc-2", &["DEBUG", "DIGEST"]), digest);
}

#[test]
fn http_server_clones_serve_their_own_identity_file() {
    let Some(mut h) = Harness::new(
        "http_server_clones_serve_their_own_identity_file",
        &["python3", "curl"],
    ) else {
        return;
    };
    let dir = h.dir("www");
    let id_file = dir.join("clone-id.txt");
    fs::write(&id_file, "template\n").unwrap();
    // Unique to this test's work dir: no other server lists it.
    let listed = format!(
        "listed-{}.txt",
        dir.parent().unwrap().file_name().unwrap().to_string_lossy()
    );
    fs::write(dir.join(&listed), "x").unwrap();
    let host_inode = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&id_file).unwrap().ino()
    };

    h.start(
        "web-t",
        "wt",
        &dir,
        &[],
        &["python3", "-m", "http.server", "9000"],
    );
    h.wait_log("web-t", "port 9000");
    let got = h.curl("wt", "http://127.0.0.1:9000/clone-id.txt");
    assert!(got.success() && got.stdout == "template\n", "{got}");

    let image = h.dir("images").join("web.img");
    let ran = template(&h, "web-t", &image, &[]);
    assert!(ran.stdout.contains("stopped"), "{ran}");
    assert!(h.instance("web-t").is_none(), "{:#?}", h.ps());

    let names = numbered("web-c", 3);
    let aids = numbered("wc", 3);
    let id_path = id_file.to_str().unwrap();
    h.clone_template(
        &names,
        &image,
        &[
            "--aid",
            "wc",
            "--name",
            "web-c",
            "--count",
            "3",
            "--identity-file",
            id_path,
        ],
    );
    let rows = rows_of(&h, &names);
    assert_own_ports(&h, &rows, &aids, 9000);

    for (name, aid) in names.iter().zip(&aids) {
        let got = h.curl(aid, "http://127.0.0.1:9000/");
        assert!(got.success(), "curl / under {aid}: {got}");
        assert!(
            got.stdout.contains(&listed) && got.stdout.contains("clone-id.txt"),
            "{name} lists its directory to {aid}: {got}"
        );
        let got = h.curl(aid, "http://127.0.0.1:9000/clone-id.txt");
        assert!(got.success(), "curl /clone-id.txt under {aid}: {got}");
        assert_eq!(
            got.stdout,
            format!("aid={aid}\nname={name}\nhostname={name}\n"),
            "{name} serves its own identity file to {aid}"
        );
    }
    let refused = h.curl("wc", "http://127.0.0.1:9000/");
    assert_eq!(
        refused.code,
        Some(7),
        "AID wc has no instance (its clones are wc-1 … wc-3): {refused}"
    );

    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        fs::read_to_string(&id_file).unwrap(),
        "template\n",
        "the host's {id_path} is untouched"
    );
    assert_eq!(fs::metadata(&id_file).unwrap().ino(), host_inode);
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(id_path),
        "the identity bind mount leaked into the host's mount namespace:\n{mounts}"
    );
}

#[test]
fn a_template_whose_files_changed_is_refused() {
    let Some(mut h) = Harness::new(
        "a_template_whose_files_changed_is_refused",
        &["gcc", "python3"],
    ) else {
        return;
    };
    // Run from a copy, so the test can change the executable.
    let (compiled, bin) = keeper_copy(&h);
    let exe = bin.to_str().unwrap().to_string();
    let data = start_keeper(&mut h, "keeper-f", "kf", &bin);
    let secret = keeper(&h, "kf").secret;
    let image = h.dir("images").join("keeper.img");
    template(&h, "keeper-f", &image, &[]);
    let none = BTreeSet::new();
    assert_eq!(
        pids_with_arg(&data),
        none,
        "the template's instance stopped"
    );

    // The template is good as long as the executable is unchanged.
    let ok = vec!["ok".to_string()];
    h.clone_template(&ok, &image, &["--aid", "f0", "--name", "ok"]);
    assert_eq!(keeper(&h, "f0").secret, secret, "a clone has the heap");
    h.stop("ok");
    assert_eq!(pids_with_arg(&data), none, "ok stopped");

    let mtime = fs::metadata(&bin).unwrap().modified().unwrap();
    let set_mtime = |path: &Path, t: SystemTime| {
        fs::File::options()
            .write(true)
            .open(path)
            .and_then(|f| f.set_modified(t))
            .unwrap_or_else(|e| panic!("setting the mtime of {}: {e}", path.display()))
    };

    // Touched: same file, another mtime.
    set_mtime(&bin, mtime + Duration::from_secs(5));
    let names = vec!["touched".to_string()];
    let ran = h.try_clone(&names, &image, &["--aid", "f1", "--name", "touched"]);
    assert_clone_refused(&h, &ran, &names, &[&exe, "changed"], &data, &none);

    // Replaced by a copy with the same bytes and mtime: another inode.
    set_mtime(&bin, mtime);
    let fresh = bin.with_extension("new");
    fs::copy(&compiled, &fresh).unwrap();
    set_mtime(&fresh, mtime);
    fs::rename(&fresh, &bin).unwrap();
    let names = numbered("replaced", 2);
    let ran = h.try_clone(
        &names,
        &image,
        &["--aid", "f2", "--name", "replaced", "--count", "2"],
    );
    assert_clone_refused(&h, &ran, &names, &[&exe, "changed"], &data, &none);

    // Gone.
    fs::remove_file(&bin).unwrap();
    let names = vec!["gone".to_string()];
    let ran = h.try_clone(&names, &image, &["--aid", "f3", "--name", "gone"]);
    assert_clone_refused(&h, &ran, &names, &[&exe, "missing"], &data, &none);
}

#[test]
fn more_clones_than_the_port_range_holds_are_refused() {
    let Some(mut h) = Harness::new(
        "more_clones_than_the_port_range_holds_are_refused",
        &["gcc", "python3"],
    ) else {
        return;
    };
    let bin = h.compile("statekeeper.c", "statekeeper");
    let data = start_keeper(&mut h, "keeper-n", "kn", &bin);
    let image = h.dir("images").join("keeper.img");
    template(&h, "keeper-n", &image, &["--leave-running"]);
    let info = h.inspect(&image);
    assert_eq!(
        info["listening"],
        serde_json::json!(["0.0.0.0:9000"]),
        "one listening socket: {info:#}"
    );
    // One clone first: its real port comes from the range, so the free
    // count in the refusal is not simply the size of the range.
    h.clone_template(
        &["one".to_string()],
        &image,
        &["--aid", "n1", "--name", "one"],
    );
    let running = pids_with_arg(&data);
    assert!(!running.is_empty(), "keeper-n and one run");
    let used = h
        .ports()
        .iter()
        .filter_map(|t| t["real_port"].as_u64())
        .filter(|p| RANGE.contains(p))
        .count() as u64;
    assert!(
        used >= 1,
        "clone one holds a real port of the range: {:#?}",
        h.ports()
    );
    let free = RANGE.end() - RANGE.start() + 1 - used;

    // Only a few of the 20000 names are checked (and stopped on drop, which
    // also kills whatever `ps` lists); the `ps` check below covers the rest.
    let names = numbered("many", 3);
    let ran = h.try_clone(&names, &image, &["--aid", "many", "--count", "20000"]);
    let free_text = format!("has {free} free");
    assert_clone_refused(
        &h,
        &ran,
        &names,
        &[
            "20000 clones",
            "1 listening socket",
            "need 20000 real ports",
            "20000-29999",
            &free_text,
        ],
        &data,
        &running,
    );
    assert_eq!(pids_with_arg(&data), running, "keeper-n and one run on");
    let ps = h.ps();
    assert_eq!(ps.len(), 2, "only keeper-n and one run: {ps:#?}");
    let mut logs: Vec<String> = fs::read_dir(h.log_path("keeper-n").parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    logs.sort();
    assert_eq!(
        logs,
        ["keeper-n", "one"],
        "no other clone's supervisor started"
    );

    // A single clone that claims an instance shell has its ports counted
    // by the shell, in the transaction that would record it: a range whose
    // one port `one` holds refuses it all the same, and nothing of it runs.
    ready_shells(&h, "keeper.img", 2);
    let held = h.translations("one")[0]["real_port"]
        .as_u64()
        .expect("one's real port");
    let range = format!("{held}-{held}");
    let lone = vec!["lone".to_string()];
    let ran = h.try_clone(&lone, &image, &["--aid", "lone", "--port-range", &range]);
    assert!(!ran.success(), "lone must be refused: {ran}");
    for says in [
        "need 1 real ports".to_string(),
        format!("port range {range} has 0 free"),
    ] {
        assert!(
            ran.stderr.contains(&says),
            "the refusal says {says:?}: {ran}"
        );
    }
    assert!(h.instance("lone").is_none(), "lone is not listed");
    assert!(h.translations("lone").is_empty(), "lone holds no port");
    assert_eq!(pids_with_arg(&data), running, "keeper-n and one run on");
    assert_eq!(
        keeper(&h, "n1").secret,
        keeper(&h, "kn").secret,
        "one and keeper-n run on, with the same heap"
    );
}

#[test]
fn an_image_that_is_no_template_is_refused() {
    let Some(mut h) = Harness::new(
        "an_image_that_is_no_template_is_refused",
        &["gcc", "python3"],
    ) else {
        return;
    };
    let bin = h.compile("statekeeper.c", "statekeeper");
    let data = start_keeper(&mut h, "keeper-p", "kp", &bin);
    let images = h.dir("images");
    let plain = images.join("plain.img");
    let ran = h.snapshot("keeper-p", &plain, &["--leave-running"]);
    assert!(ran.success(), "plain snapshot: {ran}");
    let tmpl = images.join("template.img");
    template(&h, "keeper-p", &tmpl, &[]);
    let none = BTreeSet::new();
    assert_eq!(pids_with_arg(&data), none, "keeper-p stopped");

    let plain_path = plain.to_str().unwrap();
    for (flags, names) in [
        (vec!["--aid", "p"], vec!["p".to_string()]),
        (vec!["--aid", "p", "--count", "3"], numbered("p", 3)),
    ] {
        let ran = h.try_clone(&names, &plain, &flags);
        assert_clone_refused(
            &h,
            &ran,
            &names,
            &[plain_path, "is not a template"],
            &data,
            &none,
        );
    }

    // The same instance, taken as a template, clones.
    let names = vec!["p".to_string()];
    h.clone_template(&names, &tmpl, &["--aid", "p"]);
    assert!(!keeper(&h, "p").secret.is_empty());

    // The first clone left a mark that this template's pages were checked;
    // a byte changed in place since must be found all the same.
    let mut bytes = std::fs::read(&tmpl).unwrap();
    bytes[4096 + 100] ^= 0x20;
    std::fs::write(&tmpl, &bytes).unwrap();
    let again = vec!["p2".to_string()];
    let ran = h.try_clone(&again, &tmpl, &["--aid", "p2"]);
    assert_clone_refused(
        &h,
        &ran,
        &again,
        &[tmpl.to_str().unwrap(), "pages checksum"],
        &data,
        &pids_with_arg(&data),
    );
}

#[test]
fn a_clone_name_in_use_is_refused_before_any_clone_starts() {
    let Some(mut h) = Harness::new(
        "a_clone_name_in_use_is_refused_before_any_clone_starts",
        &["gcc", "python3"],
    ) else {
        return;
    };
    let bin = h.compile("statekeeper.c", "statekeeper");
    let data = start_keeper(&mut h, "keeper-u", "ku", &bin);
    let image = h.dir("images").join("keeper.img");
    template(&h, "keeper-u", &image, &[]);

    // Two running instances: `busy`, and `set-2` in the middle of a set.
    h.clone_template(
        &["busy".to_string()],
        &image,
        &["--aid", "u1", "--name", "busy"],
    );
    h.clone_template(
        &["set-2".to_string()],
        &image,
        &["--aid", "u2", "--name", "set-2"],
    );
    let running = rows_of(&h, &["busy".to_string(), "set-2".to_string()]);
    let processes = pids_with_arg(&data);
    let secrets = [keeper(&h, "u1").secret, keeper(&h, "u2").secret];

    for (flags, names, taken) in [
        (
            vec!["--aid", "x", "--name", "busy"],
            vec!["busy".to_string()],
            "`busy`",
        ),
        (
            vec!["--aid", "s", "--name", "set", "--count", "3"],
            numbered("set", 3),
            "`set-2`",
        ),
    ] {
        let ran = h.try_clone(&names, &image, &flags);
        assert!(!ran.success(), "clone {flags:?} must be refused: {ran}");
        assert!(
            ran.stderr.contains(taken) && ran.stderr.contains("already in use"),
            "clone {flags:?}: the message must name {taken} as in use: {ran}"
        );
        let fresh: Vec<String> = names
            .iter()
            .filter(|n| !["busy", "set-2"].contains(&n.as_str()))
            .cloned()
            .collect();
        assert_clone_refused(&h, &ran, &fresh, &[taken], &data, &processes);
        assert_eq!(pids_with_arg(&data), processes, "processes after {flags:?}");
        assert_eq!(
            rows_of(&h, &["busy".to_string(), "set-2".to_string()]),
            running,
            "the running instances are untouched by {flags:?}"
        );
        for name in ["busy", "set-2"] {
            assert!(
                h.log(name).contains("instance started"),
                "{name}'s log kept after {flags:?}:\n{}",
                h.log(name)
            );
        }
        assert_eq!([keeper(&h, "u1").secret, keeper(&h, "u2").secret], secrets);
        for aid in ["x", "s-1", "s-3"] {
            let ran = query_keeper(&h, aid, "");
            assert!(!ran.success(), "AID {aid} has no instance: {ran}");
        }
    }
}

/// Starts `whoami.py` on port 9000 as `name` under `aid`, serving
/// `id_file` (a file of this test's, so its path marks the instance's
/// processes), and takes it as a template at `image` (with `flags`).
fn whoami_template(
    h: &mut Harness,
    name: &str,
    aid: &str,
    id_file: &Path,
    image: &Path,
    flags: &[&str],
) {
    fs::write(id_file, "template\n").unwrap();
    let dir = id_file.parent().unwrap().to_path_buf();
    h.start(
        name,
        aid,
        &dir,
        &[],
        &[
            "python3",
            &script("whoami.py"),
            "9000",
            id_file.to_str().unwrap(),
        ],
    );
    h.wait_log(name, "serving on port 9000");
    template(h, name, image, flags);
}

/// What `whoami.py` answers a client of `aid`: (hostname, uname's
/// nodename, the identity file's contents).
fn whoami(h: &Harness, aid: &str) -> (String, String, String) {
    let got = h.curl(aid, "http://127.0.0.1:9000/");
    assert!(got.success(), "whoami under {aid}: {got}");
    let (head, identity) = got
        .stdout
        .split_once("---\n")
        .unwrap_or_else(|| panic!("whoami under {aid}: no `---`: {got}"));
    let field = |key: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("whoami under {aid}: no {key}: {got}"))
            .to_string()
    };
    (field("hostname"), field("uname"), identity.to_string())
}

/// The host's hostname, as the kernel of this UTS namespace has it.
fn host_hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim_end()
        .to_string()
}

#[test]
fn twenty_clones_start_from_one_command_and_each_answers_its_own_aid() {
    let Some(mut h) = Harness::new(
        "twenty_clones_start_from_one_command_and_each_answers_its_own_aid",
        &["python3", "curl"],
    ) else {
        return;
    };
    let id_file = h.dir("www").join("id.env");
    let image = h.dir("images").join("whoami.img");
    whoami_template(&mut h, "who-t", "wt", &id_file, &image, &[]);
    let id_path = id_file.to_str().unwrap();

    let names = numbered("who", 20);
    let started = Instant::now();
    h.clone_template(
        &names,
        &image,
        &["--aid", "who", "--count", "20", "--identity-file", id_path],
    );
    uncaptured(&format!(
        "clone --count 20 of whoami.py: {:.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    ));
    let rows = rows_of(&h, &names);
    assert_own_ports(&h, &rows, &names, 9000);
    let supervisors: BTreeSet<u64> = rows
        .iter()
        .map(|r| r["supervisor_pid"].as_u64().expect("supervisor_pid"))
        .collect();
    assert_eq!(supervisors.len(), 20, "a supervisor per clone: {rows:#?}");
    for name in &names {
        // Names and AIDs default alike: who-i; so does the hostname.
        assert_eq!(
            whoami(&h, name),
            (
                name.clone(),
                name.clone(),
                format!("aid={name}\nname={name}\nhostname={name}\n")
            ),
            "clone {name} answers its own AID, as itself"
        );
    }
    let refused = h.curl("who", "http://127.0.0.1:9000/");
    assert_eq!(refused.code, Some(7), "AID who has no instance: {refused}");
}

#[test]
fn clones_get_their_hostname_and_values_from_the_rules() {
    let Some(mut h) = Harness::new(
        "clones_get_their_hostname_and_values_from_the_rules",
        &["python3", "curl"],
    ) else {
        return;
    };
    let host = host_hostname();
    let id_file = h.dir("www").join("id.env");
    let id_path = id_file.to_str().unwrap().to_string();
    let image = h.dir("images").join("whoami.img");
    // Left running: the template keeps the host's hostname and file.
    whoami_template(
        &mut h,
        "host-t",
        "ht",
        &id_file,
        &image,
        &["--leave-running"],
    );

    let config = h.dir("config").join("shop.toml");
    fs::write(
        &config,
        format!(
            "[clone]\nidentity_file = \"{id_path}\"\nhostname = \"shop-{{n}}.example\"\n\
             [clone.values]\nSHARD = \"{{n}}\"\nDB_URL = \"postgres://db/{{aid}}\"\n"
        ),
    )
    .unwrap();
    let names = numbered("shop", 2);
    h.clone_template(
        &names,
        &image,
        &[
            "--aid",
            "shop",
            "--count",
            "2",
            "--config",
            config.to_str().unwrap(),
            // Over the config's DB_URL.
            "--value",
            "DB_URL=pg://{name}/{n}",
        ],
    );
    for (i, name) in (1..).zip(&names) {
        let hostname = format!("shop-{i}.example");
        assert_eq!(
            whoami(&h, name),
            (
                hostname.clone(),
                hostname.clone(),
                format!("aid={name}\nname={name}\nhostname={hostname}\nDB_URL=pg://{name}/{i}\nSHARD={i}\n")
            ),
            "clone {name}"
        );
    }

    // One clone, its hostname from the flag; without an identity file it
    // reads the host's file.
    let solo = vec!["solo".to_string()];
    h.clone_template(
        &solo,
        &image,
        &["--aid", "solo", "--hostname", "solo.local"],
    );
    assert_eq!(
        whoami(&h, "solo"),
        (
            "solo.local".into(),
            "solo.local".into(),
            "template\n".into()
        )
    );

    assert_eq!(
        whoami(&h, "ht"),
        (host.clone(), host.clone(), "template\n".into()),
        "the template runs on with the host's hostname and file"
    );
    assert_eq!(host_hostname(), host, "the host's hostname is untouched");
    assert_eq!(fs::read_to_string(&id_file).unwrap(), "template\n");
}

#[test]
fn clone_flags_that_conflict_are_refused_before_any_clone_starts() {
    let Some(mut h) = Harness::new(
        "clone_flags_that_conflict_are_refused_before_any_clone_starts",
        &["python3", "curl"],
    ) else {
        return;
    };
    let id_file = h.dir("www").join("id.env");
    let id_path = id_file.to_str().unwrap().to_string();
    let image = h.dir("images").join("whoami.img");
    whoami_template(&mut h, "conf-t", "ct", &id_file, &image, &[]);
    let none = BTreeSet::new();
    let long = format!("{}-{{n}}", "h".repeat(62));
    for (flags, names, says) in [
        (
            vec!["--aid", "a", "--aid", "b", "--count", "3"],
            vec!["a".to_string(), "b".to_string()],
            vec!["--count 3 with 2 --aid"],
        ),
        (
            vec![
                "--aid", "a", "--count", "2", "--name", "x", "--name", "y", "--name", "z",
            ],
            vec!["x".to_string(), "y".to_string(), "z".to_string()],
            vec!["3 --name for 2 clones"],
        ),
        (
            vec!["--aid", "v", "--count", "2", "--value", "SHARD={n}"],
            numbered("v", 2),
            vec!["SHARD", "need an identity file"],
        ),
        (
            vec!["--aid", "l", "--count", "10", "--hostname", &long],
            numbered("l", 10),
            vec!["clone l-10", "at most 64"],
        ),
    ] {
        let ran = h.try_clone(&names, &image, &flags);
        assert_clone_refused(&h, &ran, &names, &says, &id_path, &none);
    }
}

/// Two free consecutive ports (IPv4 and IPv6) above 30000.
fn free_pair() -> u16 {
    let free = |p: u16| {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, p)).is_ok()
            && TcpListener::bind((Ipv6Addr::UNSPECIFIED, p)).is_ok()
    };
    (30000..32000)
        .find(|&p| free(p) && free(p + 1))
        .expect("two free consecutive ports in 30000-32000")
}

#[test]
fn a_clone_that_cannot_start_is_reported_and_the_others_run_on() {
    let Some(mut h) = Harness::new(
        "a_clone_that_cannot_start_is_reported_and_the_others_run_on",
        &["python3", "curl"],
    ) else {
        return;
    };
    let id_file = h.dir("www").join("id.env");
    let id_path = id_file.to_str().unwrap().to_string();
    let image = h.dir("images").join("whoami.img");
    // Left running, it holds virtual port 9000 for its AID: the clones'
    // real ports come from the range.
    whoami_template(
        &mut h,
        "fail-t",
        "ft",
        &id_file,
        &image,
        &["--leave-running"],
    );
    let template_processes = pids_with_arg(&id_path);

    // Two real ports the registry knows free, one of them taken by a
    // program outside appshot: one clone gets a port, the other none.
    let port = free_pair();
    let _squatter = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port + 1)).unwrap();
    let names = numbered("f", 2);
    let range = format!("{port}-{}", port + 1);
    let ran = h.try_clone(
        &names,
        &image,
        &["--aid", "f", "--count", "2", "--port-range", &range],
    );
    assert!(!ran.success(), "one of two clones cannot start: {ran}");
    assert_eq!(ran.code, Some(125), "{ran}");
    let printed: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(printed.len(), 1, "the clone that runs is printed: {ran}");
    let running = printed[0].to_string();
    let failed = names
        .iter()
        .find(|n| **n != running)
        .expect("the other")
        .clone();
    assert!(names.contains(&running), "{ran}");
    for says in [
        format!("clone `{failed}`"),
        "no real port free for virtual port 9000".to_string(),
        format!(
            "1 of 2 clones failed to start ({failed}) and left nothing running; 1 run: {running}"
        ),
    ] {
        assert!(ran.stderr.contains(&says), "the error says {says:?}: {ran}");
    }
    assert_left_nothing(
        &h,
        "clone",
        std::slice::from_ref(&failed),
        "no-such-marker",
        &BTreeSet::new(),
    );
    assert!(
        h.log(&failed).contains("no real port free"),
        "the failed clone's log says why:\n{}",
        h.log(&failed)
    );
    // The template's and the running clone's processes: the failed clone's
    // namespace went with its supervisor.
    let rows = rows_of(&h, &["fail-t".to_string(), running.clone()]);
    assert_eq!(
        h.ps().len(),
        2,
        "only the template and {running} run: {:#?}",
        h.ps()
    );
    assert_eq!(
        port_pairs(&rows[1])[0].real,
        port,
        "{running} took the free port"
    );
    assert_eq!(
        pids_with_arg(&id_path).len(),
        template_processes.len() * 2,
        "the template's processes and as many of the running clone's"
    );
    assert_eq!(whoami(&h, &running).0, running);
    let refused = h.curl(&failed, "http://127.0.0.1:9000/");
    assert_eq!(
        refused.code,
        Some(7),
        "AID {failed} has no instance: {refused}"
    );
}

/// The supervisor PIDs of template `name`'s instance shells that are ready
/// (their sockets), once there are `want` of them.
fn ready_shells(h: &Harness, name: &str, want: usize) -> BTreeSet<u32> {
    let dir = h.run_dir().join("templates").join(name).join("shells");
    let ready = || -> BTreeSet<u32> {
        fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let file = e.file_name().to_str()?.to_string();
                let stem = file.strip_suffix(".sock")?;
                let pid: u32 = stem.split_once('-')?.0.parse().ok()?;
                alive(pid).then_some(pid)
            })
            .collect()
    };
    assert!(
        poll(Duration::from_secs(20), || ready().len() == want),
        "{name}: {want} shells ready expected, found {:?} in {}",
        ready(),
        dir.display()
    );
    ready()
}

fn supervisor_of(h: &Harness, name: &str) -> u32 {
    let row = h
        .instance(name)
        .unwrap_or_else(|| panic!("{name} is not listed"));
    row["supervisor_pid"].as_u64().expect("supervisor_pid") as u32
}

#[test]
fn clones_claim_ready_shells_once_the_pool_refills_and_goes_with_its_template() {
    let Some(mut h) = Harness::new(
        "clones_claim_ready_shells_once_the_pool_refills_and_goes_with_its_template",
        &["python3", "curl"],
    ) else {
        return;
    };
    let id_file = h.dir("www").join("id.env");
    let id_path = id_file.to_str().unwrap().to_string();
    let image = h.dir("images").join("whoami.img");
    whoami_template(&mut h, "pool-t", "pt", &id_file, &image, &[]);
    let flags = |aid: &'static str| ["--aid", aid, "--identity-file", &id_path, "--pool", "2"];

    // No shell for the first clone; it leaves two behind.
    h.clone_template(&["p1".into()], &image, &flags("p1"));
    let shells = ready_shells(&h, "whoami.img", 2);

    // The next clone is one of them: its supervisor, with the clone's own
    // identity; it is never handed out again, and the pool is refilled.
    h.clone_template(&["p2".into()], &image, &flags("p2"));
    let claimed = supervisor_of(&h, "p2");
    assert!(
        shells.contains(&claimed),
        "p2's supervisor {claimed} is none of the shells {shells:?}"
    );
    // It shows as what it is now: a clone's supervisor, no shell.
    let shown = common::cmdline(claimed);
    assert!(
        shown.contains(" __supervise") && !shown.contains("__shell"),
        "p2's supervisor shows as {shown:?}"
    );
    let refilled = ready_shells(&h, "whoami.img", 2);
    assert!(
        !refilled.contains(&claimed),
        "claimed shell {claimed} still offered: {refilled:?}"
    );
    assert_eq!(
        whoami(&h, "p2"),
        (
            "p2".into(),
            "p2".into(),
            "aid=p2\nname=p2\nhostname=p2\n".into()
        )
    );
    let mut cmd = h.appshot();
    cmd.arg("templates");
    let templates = common::run(&mut cmd, Duration::from_secs(10));
    assert!(
        templates
            .stdout
            .lines()
            .any(|l| l.starts_with("whoami.img") && l.trim_end().ends_with("2/2")),
        "templates shows the ready shells: {templates}"
    );

    // Killed shells are not handed out: one's supervisor (its socket
    // stays, nobody accepts on it), the other's namespace init (the
    // shell goes with it).
    let [a, b]: [u32; 2] = refilled
        .iter()
        .copied()
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    let b_init = common::children(b)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("shell {b} has no init"));
    for pid in [a, b_init] {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::SIGKILL,
        )
        .unwrap();
    }
    assert!(
        poll(Duration::from_secs(5), || !alive(a) && !alive(b)),
        "killed shells linger"
    );
    h.clone_template(&["p3".into()], &image, &flags("p3"));
    let p3 = supervisor_of(&h, "p3");
    assert!(p3 != a && p3 != b, "a killed shell was handed out");
    assert_eq!(whoami(&h, "p3").0, "p3");

    // `template rm` ends the shells and the holder; the clones run on.
    let last = ready_shells(&h, "whoami.img", 2);
    let mut cmd = h.appshot();
    cmd.args(["template", "rm", "whoami.img"]);
    let ran = common::run(&mut cmd, Duration::from_secs(10));
    assert!(ran.success(), "template rm: {ran}");
    assert!(
        poll(Duration::from_secs(5), || last.iter().all(|&p| !alive(p))),
        "shells {last:?} outlived template rm"
    );
    for name in ["p1", "p2", "p3"] {
        assert_eq!(whoami(&h, name).0, name, "{name} runs on after template rm");
    }
}

/// A single detached clone that claims a shell leaves the template
/// unopened and its logs to the shell; what the shell then refuses reaches
/// the CLI, which prints it and fails as it did when it made the logs
/// itself. Here the logs cannot be made (`RUN_DIR/logs` is a file): the
/// same message and status claimed from a shell as from a template with
/// none (a copy under another name). The test fails where the CLI made
/// the logs before its claim: no shell takes the claim.
#[test]
fn a_refusal_by_the_claimed_shell_is_the_clis_own() {
    let Some(mut h) = Harness::new(
        "a_refusal_by_the_claimed_shell_is_the_clis_own",
        &["python3", "curl"],
    ) else {
        return;
    };
    let id_file = h.dir("www").join("id.env");
    let image = h.dir("images").join("whoami.img");
    whoami_template(&mut h, "refuse-t", "rt", &id_file, &image, &[]);
    h.clone_template(&["r1".into()], &image, &["--aid", "r1"]);
    let shells = ready_shells(&h, "whoami.img", 2);
    let copy = h.dir("images").join("copy.img");
    fs::copy(&image, &copy).unwrap();
    let processes = pids_with_arg(id_file.to_str().unwrap());

    let logs = h.run_dir().join("logs");
    let aside = h.run_dir().join("logs.aside");
    fs::rename(&logs, &aside).unwrap();
    fs::write(&logs, "").unwrap();
    let names = vec!["r2".to_string()];
    let claimed = h.try_clone(&names, &image, &["--aid", "r2"]);
    // With no shells to start for the copy: no holder would take them away.
    let unclaimed = h.try_clone(&names, &copy, &["--aid", "r2", "--pool", "0"]);
    fs::remove_file(&logs).unwrap();
    fs::rename(&aside, &logs).unwrap();

    let gone: Vec<u32> = shells.iter().copied().filter(|&p| !alive(p)).collect();
    assert_eq!(
        gone.len(),
        1,
        "one shell of {shells:?} took the claim and ended"
    );
    for ran in [&claimed, &unclaimed] {
        assert_eq!(ran.code, Some(125), "{ran}");
        assert!(
            ran.stderr.contains("logs") && ran.stderr.contains("not a directory"),
            "the refusal says why: {ran}"
        );
        assert_clone_refused(&h, ran, &names, &[], id_file.to_str().unwrap(), &processes);
    }
    assert_eq!(claimed.stderr, unclaimed.stderr);
    assert_eq!(whoami(&h, "r1").0, "r1", "r1 runs on");
}

#[test]
fn clones_get_their_environment_file_from_env_rules() {
    let Some(mut h) = Harness::new(
        "clones_get_their_environment_file_from_env_rules",
        &["python3", "curl", "nsenter"],
    ) else {
        return;
    };
    // The template serves the file at the path every clone sees its own
    // environment file at.
    let env_file = h.dir("etc").join("app.env");
    let env_path = env_file.to_str().unwrap().to_string();
    let image = h.dir("images").join("whoami.img");
    whoami_template(&mut h, "env-t", "et", &env_file, &image, &[]);

    let refused = h.try_clone(&["lone".into()], &image, &["--aid", "lone", "--env", "A=b"]);
    assert!(
        !refused.success() && refused.stderr.contains("--env-file"),
        "--env without a file to carry it: {refused}"
    );

    let config = h.dir("config").join("shop.toml");
    fs::write(
        &config,
        format!(
            "[clone]\nenv_file = \"{env_path}\"\n[clone.env]\nREPLICA = \"r{{n}}\"\nDB = \"x\"\n"
        ),
    )
    .unwrap();
    let names = numbered("shop", 2);
    h.clone_template(
        &names,
        &image,
        &[
            "--aid",
            "shop",
            "--count",
            "2",
            "--config",
            config.to_str().unwrap(),
            // Over the config's DB, with a quote to keep.
            "--env",
            "DB=pg://{aid}/it's",
        ],
    );
    for (i, name) in (1..).zip(&names) {
        assert_eq!(
            whoami(&h, name).2,
            format!("DB='pg://{name}/it'\\''s'\nREPLICA='r{i}'\n"),
            "clone {name} reads its own environment file"
        );
        // A process started later in the clone's mount namespace, by sh
        // reading the file as an env file.
        let pid = pid_of(&h.instance(name).unwrap());
        let mut cmd = std::process::Command::new("nsenter");
        cmd.args(["-t", &pid.to_string(), "-m", "--", "sh", "-c"]).arg(format!(
            "set -a; . {env_path}; exec python3 -c 'import os; print(os.environ[\"DB\"], os.environ[\"REPLICA\"])'"
        ));
        let ran = common::run(&mut cmd, Duration::from_secs(10));
        assert!(ran.success(), "{ran}");
        assert_eq!(ran.stdout.trim_end(), format!("pg://{name}/it's r{i}"));
    }
    assert_eq!(
        fs::read_to_string(&env_file).unwrap(),
        "template\n",
        "the host's file is untouched"
    );
}

/// `stat` of `path` as the clone's mount namespace (`pid`'s) shows it:
/// mode, uid and gid.
fn stat_in(pid: u32, path: &str) -> String {
    let mut cmd = std::process::Command::new("nsenter");
    cmd.args([
        "-t",
        &pid.to_string(),
        "-m",
        "--",
        "stat",
        "-c",
        "%a %u %g",
        path,
    ]);
    let ran = common::run(&mut cmd, Duration::from_secs(10));
    assert!(ran.success(), "stat {path} in the clone: {ran}");
    ran.stdout.trim_end().to_string()
}

/// `cat path` in the clone's mount namespace as `uid`:`uid`.
fn cat_as(pid: u32, uid: u32, path: &str) -> Ran {
    let mut cmd = std::process::Command::new("nsenter");
    cmd.args(["-t", &pid.to_string(), "-m"])
        .args(["-S", &uid.to_string(), "-G", &uid.to_string()])
        .args(["--", "cat", path]);
    common::run(&mut cmd, Duration::from_secs(10))
}

#[test]
fn a_clones_own_files_are_private_to_the_user_it_runs_as() {
    use std::os::unix::fs::PermissionsExt;
    let Some(mut h) = Harness::new(
        "a_clones_own_files_are_private_to_the_user_it_runs_as",
        &["python3", "curl", "nsenter", "stat"],
    ) else {
        return;
    };
    const NOBODY: u32 = 65534;
    // The application runs as nobody: the harness's work dir is root's
    // alone, so let it reach its own.
    let dir = h.dir("www");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(dir.parent().unwrap(), fs::Permissions::from_mode(0o755)).unwrap();
    let id_file = dir.join("id.env");
    let env_file = dir.join("app.env");
    fs::write(&id_file, "template\n").unwrap();
    fs::write(&env_file, "").unwrap();
    let (id_path, env_path) = (id_file.to_str().unwrap(), env_file.to_str().unwrap());
    h.start(
        "priv-t",
        "prt",
        &dir,
        &["--user", "65534:65534"],
        &["python3", &script("whoami.py"), "9000", id_path],
    );
    h.wait_log("priv-t", "serving on port 9000");
    let image = h.dir("images").join("whoami.img");
    template(&h, "priv-t", &image, &[]);

    let flags = [
        "--identity-file",
        id_path,
        "--env-file",
        env_path,
        "--env",
        "TOKEN=s3cret-{n}",
        "--pool",
        "1",
    ];
    // The first clone starts its own supervisor, the second claims the
    // shell the first left: both make the files alike.
    for (i, name) in (1..).zip(["priv1", "priv2"]) {
        let mut args = vec!["--aid", name];
        args.extend(flags);
        h.clone_template(&[name.into()], &image, &args);
        // The application, as nobody, reads its own identity file.
        assert_eq!(
            whoami(&h, name).2,
            format!("aid={name}\nname={name}\nhostname={name}\n"),
            "{name} reads its identity file"
        );
        let pid = pid_of(&h.instance(name).unwrap());
        let owner = format!("600 {NOBODY} {NOBODY}");
        for path in [id_path, env_path] {
            assert_eq!(stat_in(pid, path), owner, "{name}: {path} in the clone");
            let other = cat_as(pid, 1234, path);
            assert!(
                !other.success() && other.stderr.contains("Permission denied"),
                "{name}: uid 1234 reads {path}: {other}"
            );
        }
        let own = cat_as(pid, NOBODY, env_path);
        assert!(own.success(), "{name}: nobody reads its env file: {own}");
        assert_eq!(
            own.stdout, "TOKEN='s3cret-1'\n",
            "{name} (clone {i} of one)"
        );
        // The host's files are untouched.
        assert_eq!(fs::read_to_string(&id_file).unwrap(), "template\n");
        assert_eq!(fs::read_to_string(&env_file).unwrap(), "");
    }
}

fn signal_bit(mask: &str, signo: u32) -> bool {
    u64::from_str_radix(mask, 16).unwrap() & (1 << (signo - 1)) != 0
}

#[test]
fn clones_inherit_their_templates_signal_actions_and_limits_from_its_holder() {
    let Some(mut h) = Harness::new(
        "clones_inherit_their_templates_signal_actions_and_limits_from_its_holder",
        &["gcc"],
    ) else {
        return;
    };
    let bin = h.compile("sigkeeper.c", "sigkeeper");
    let cwd = h.dir("sk");
    h.start("sk", "sk", &cwd, &[], &[bin.to_str().unwrap()]);
    h.wait_log("sk", "ready");
    let original = pid_of(&h.instance("sk").expect("sk listed"));
    let kept = SignalState::of(original);
    assert!(
        signal_bit(&kept.caught, libc::SIGUSR1 as u32)
            && signal_bit(&kept.caught, libc::SIGCHLD as u32),
        "the template catches SIGUSR1 and SIGCHLD: {}",
        kept.caught
    );
    let image = h.dir("images").join("sk.img");
    template(&h, "sk", &image, &["--leave-running"]);

    // Two from one command (the first builds the holder), then one that
    // claims an instance shell started after them.
    let names = numbered("skc", 2);
    h.clone_template(&names, &image, &["--aid", "skc", "--count", "2"]);
    ready_shells(&h, "sk.img", 2);
    h.clone_template(&["sk3".to_string()], &image, &["--aid", "sk3"]);
    for name in names.iter().chain([&"sk3".to_string()]) {
        let pid = pid_of(&h.instance(name).unwrap_or_else(|| panic!("{name} listed")));
        // The inherited handler is the application's own: it runs.
        kept.assert_kept(&h, name, pid);
    }

    // The holder carries the handlers and limits for its clones, but no
    // signal reaches it, it reaps its fork helpers by ignoring SIGCHLD,
    // and the CPU time of every fork is its own, under no template limit.
    let holder = h.holder_pid("sk.img");
    let held = status_field(holder, "SigCgt");
    assert!(
        signal_bit(&held, libc::SIGUSR1 as u32),
        "the holder carries the SIGUSR1 handler: {held}"
    );
    let blocked = u64::from_str_radix(&status_field(holder, "SigBlk"), 16).unwrap();
    let handled = u64::from_str_radix(&held, 16).unwrap();
    assert_eq!(
        blocked & handled,
        handled,
        "no signal the holder has a handler for can reach it: blocked {blocked:x}, handled {handled:x}"
    );
    assert!(signal_bit(
        &status_field(holder, "SigIgn"),
        libc::SIGCHLD as u32
    ));
    let holder_limits = fs::read_to_string(format!("/proc/{holder}/limits")).unwrap();
    let line = |text: &str, what: &str| {
        text.lines()
            .find(|l| l.starts_with(what))
            .unwrap_or_else(|| panic!("no {what}:\n{text}"))
            .split_whitespace()
            .skip(what.split_whitespace().count())
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(line(&holder_limits, "Max core file size"), "0 0");
    assert_eq!(
        line(&holder_limits, "Max cpu time"),
        "unlimited unlimited",
        "no template's CPU limit on the holder"
    );
    assert_eq!(line(&kept.limits, "Max cpu time"), "3000 4000");
}
