//! known_hosts files around the testbed's real host keys
//! (`fixtures/known_hosts`, see its README.md: the expected lines were
//! checked with `ssh-keygen -F`), read by `ssh::known_hosts`.

use russh::keys::PublicKey;
use ssh_spawner::ssh::known_hosts::{self, check, recorded_algorithms, Verdict};

fn path(name: &str) -> String {
    format!("{}/fixtures/known_hosts/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> String {
    let p = path(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// The key `ssh-keyscan` got from `address`.
fn scanned(address: &str) -> PublicKey {
    let text = fixture("keyscan.txt");
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(address))
        .unwrap_or_else(|| panic!("{address} not scanned"));
    let mut f = line.split_whitespace();
    assert_eq!(f.nth(1), Some("ssh-ed25519"));
    russh::keys::parse_public_key_base64(f.next().unwrap()).unwrap()
}

/// The key on `line` (1-based) of `lab_known_hosts`.
fn key_on_line(line: usize) -> PublicKey {
    let text = fixture("lab_known_hosts");
    let l = text.lines().nth(line - 1).unwrap();
    let blob = l.split_whitespace().last().unwrap();
    russh::keys::parse_public_key_base64(blob).unwrap()
}

const NODE1: &str = "198.18.0.11";
const NODE2: &str = "198.18.0.12";
const NODE3: &str = "198.18.0.13";
const NODE4: &str = "198.18.0.14";

#[test]
fn every_usable_line_is_read_and_the_malformed_ones_are_named() {
    let (entries, skipped) = known_hosts::parse(&fixture("lab_known_hosts"));
    assert_eq!(
        entries.iter().map(|e| e.line).collect::<Vec<_>>(),
        vec![3, 4, 8, 9, 11, 13, 15, 17, 19, 21]
    );
    assert_eq!(
        skipped.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
        vec![23, 24, 25]
    );
    assert_eq!(skipped[0].1, "expected: hosts key-type base64-key");
    assert!(skipped[1].1.starts_with("bad key: "), "{}", skipped[1].1);
    assert_eq!(skipped[2].1, "unknown marker @bogus");
    // `load` reads the same file the same way.
    let loaded = known_hosts::load(std::path::Path::new(&path("lab_known_hosts"))).unwrap();
    assert_eq!(loaded.len(), 10);
}

#[test]
fn hosts_by_address_name_hash_port_and_pattern() {
    let (e, _) = known_hosts::parse(&fixture("lab_known_hosts"));
    let (n1, n2, n3, n4) = (
        scanned(NODE1),
        scanned(NODE2),
        scanned(NODE3),
        scanned(NODE4),
    );
    let known = |line| Verdict::Known { line };
    assert_eq!(check(&e, NODE1, 22, &n1), known(3));
    assert_eq!(check(&e, "node1", 22, &n1), known(3));
    assert_eq!(check(&e, "NODE1", 22, &n1), known(3));
    assert_eq!(check(&e, NODE2, 22, &n2), known(4));
    assert_eq!(check(&e, "node2", 22, &n2), known(4));
    // Hashed: line 8 is "node3", line 9 "198.18.0.13".
    assert_eq!(check(&e, "node3", 22, &n3), known(8));
    assert_eq!(check(&e, NODE3, 22, &n3), known(9));
    // node4 is recorded for port 2222 only.
    assert_eq!(check(&e, NODE4, 2222, &n4), known(11));
    assert_eq!(check(&e, NODE4, 22, &n4), Verdict::Unknown);
    assert_eq!(check(&e, NODE1, 2222, &n1), Verdict::Unknown);
    // Wildcards and negation.
    assert_eq!(check(&e, "a.compute.lab.example.org", 22, &n2), known(13));
    assert_eq!(
        check(&e, "login.compute.lab.example.org", 22, &n2),
        Verdict::Unknown
    );
    assert_eq!(check(&e, "gpu1", 22, &n1), known(15));
    assert_eq!(check(&e, "gpu10", 22, &n1), Verdict::Unknown);
}

#[test]
fn changed_revoked_and_ca_keys() {
    let (e, _) = known_hosts::parse(&fixture("lab_known_hosts"));
    let (n1, n3) = (scanned(NODE1), scanned(NODE3));
    // Another host's key: changed, naming the first line of the host.
    assert_eq!(check(&e, NODE2, 22, &n1), Verdict::Changed { line: 4 });
    assert_eq!(check(&e, "node3", 22, &n1), Verdict::Changed { line: 8 });
    assert_eq!(check(&e, "gpu7", 22, &n3), Verdict::Changed { line: 15 });
    // The ECDSA key recorded for node2's address is known there too.
    let ecdsa = key_on_line(17);
    assert_eq!(check(&e, NODE2, 22, &ecdsa), Verdict::Known { line: 17 });
    assert_eq!(check(&e, "node2", 22, &ecdsa), Verdict::Changed { line: 4 });
    // The revoked key is refused for every host, listed or not.
    let leaked = key_on_line(19);
    for host in [NODE1, "node3", "gpu1", "anything.example.org"] {
        assert_eq!(check(&e, host, 22, &leaked), Verdict::Revoked { line: 19 });
    }
    // A CA line never vouches for a plain key.
    let ca = key_on_line(21);
    assert_eq!(check(&e, "x.lab.example.org", 22, &ca), Verdict::Unknown);
    assert_eq!(
        check(&e, "a.compute.lab.example.org", 22, &ca),
        Verdict::Changed { line: 13 }
    );
}

#[test]
fn the_algorithms_on_record_for_a_host() {
    let (e, _) = known_hosts::parse(&fixture("lab_known_hosts"));
    let names = |host: &str, port| -> Vec<String> {
        recorded_algorithms(&e, host, port)
            .iter()
            .map(|a| a.as_str().to_string())
            .collect()
    };
    assert_eq!(names(NODE2, 22), ["ssh-ed25519", "ecdsa-sha2-nistp256"]);
    assert_eq!(names("node2", 22), ["ssh-ed25519"]);
    assert_eq!(names(NODE4, 2222), ["ssh-ed25519"]);
    // Revoked and CA lines record no algorithm to prefer.
    assert!(names("login.compute.lab.example.org", 22).is_empty());
}

#[test]
fn a_file_hashed_by_ssh_keygen() {
    let (e, skipped) = known_hosts::parse(&fixture("hashed_known_hosts"));
    assert!(skipped.is_empty());
    assert_eq!(e.len(), 6);
    assert!(fixture("hashed_known_hosts")
        .lines()
        .all(|l| l.starts_with("|1|")));
    for (line, (host, address)) in [("node1", NODE1), ("node2", NODE2), ("node3", NODE3)]
        .into_iter()
        .enumerate()
    {
        let key = scanned(address);
        let known = |l| Verdict::Known { line: l };
        assert_eq!(check(&e, host, 22, &key), known(2 * line + 1), "{host}");
        assert_eq!(
            check(&e, address, 22, &key),
            known(2 * line + 2),
            "{address}"
        );
        assert_eq!(check(&e, host, 2222, &key), Verdict::Unknown);
    }
    assert_eq!(check(&e, "node4", 22, &scanned(NODE4)), Verdict::Unknown);
    assert_eq!(
        check(&e, NODE1, 22, &scanned(NODE2)),
        Verdict::Changed { line: 2 }
    );
}
