//! Unmodified `redis-server --port 6379` instances, one per AID.

mod common;

use std::collections::BTreeSet;

use common::{port_pairs, redis_cli, start_redis, Harness};

fn dbsize(h: &Harness, aid: &str) -> u64 {
    let out = redis_cli(h, aid, &["DBSIZE"]);
    out.parse()
        .unwrap_or_else(|_| panic!("DBSIZE under {aid}: {out:?}"))
}

#[test]
fn redis_instances_on_6379_keep_their_data_apart() {
    let Some(mut h) = Harness::new(
        "redis_instances_on_6379_keep_their_data_apart",
        &["redis-server", "redis-cli", "redis-benchmark"],
    ) else {
        return;
    };
    let aids = ["ra", "rb", "rc"];
    for aid in aids {
        start_redis(&mut h, &format!("redis-{aid}"), aid, &[]);
    }

    // Not assuming real == virtual: the host may run its own redis on 6379.
    let mut reals = BTreeSet::new();
    for row in h.ps() {
        let pairs = port_pairs(&row);
        assert!(!pairs.is_empty(), "{row}");
        for p in pairs {
            assert_eq!(p.virtual_port, 6379, "{row}");
            assert!(reals.insert(p.real), "real port {} used twice", p.real);
        }
    }

    assert_eq!(redis_cli(&h, "ra", &["SET", "owner", "value-of-ra"]), "OK");
    assert_eq!(redis_cli(&h, "rb", &["SET", "owner", "value-of-rb"]), "OK");
    assert_eq!(redis_cli(&h, "rb", &["SET", "only-rb", "1"]), "OK");
    assert_eq!(redis_cli(&h, "ra", &["GET", "owner"]), "value-of-ra");
    assert_eq!(redis_cli(&h, "rb", &["GET", "owner"]), "value-of-rb");
    assert_eq!(
        redis_cli(&h, "rc", &["GET", "owner"]),
        "",
        "rc never set it"
    );
    assert_eq!(redis_cli(&h, "ra", &["EXISTS", "only-rb"]), "0");
    assert_eq!(
        [dbsize(&h, "ra"), dbsize(&h, "rb"), dbsize(&h, "rc")],
        [1, 2, 0]
    );

    // 50 concurrent connections, each routed through the supervisor.
    let bench = h.client(
        "rc",
        &[
            "redis-benchmark",
            "-q",
            "-t",
            "set,get",
            "-n",
            "20000",
            "-p",
            "6379",
        ],
    );
    assert!(bench.success(), "redis-benchmark: {bench}");
    for test in ["SET:", "GET:"] {
        assert!(
            bench.stdout.contains(test) && bench.stdout.contains("requests per second"),
            "redis-benchmark did not finish {test}: {bench}"
        );
    }
    assert_eq!(redis_cli(&h, "rc", &["EXISTS", "key:__rand_int__"]), "1");
    assert_eq!(
        [dbsize(&h, "ra"), dbsize(&h, "rb"), dbsize(&h, "rc")],
        [1, 2, 1],
        "only rc's instance took the benchmark's writes"
    );
}
