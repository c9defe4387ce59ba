//! tests/testbed/testbed.sh on a fresh machine: every subcommand, run from
//! the state of a machine where no testbed has ever run (no owner directory
//! under /run, no namespaces), exits as documented and says why when it
//! fails.
//!
//! The fresh machine is made, not hoped for: the script runs inside a
//! private mount namespace (`unshare --mount`) with an empty tmpfs over
//! /run, so it sees no /run/nodetunnel-testbed, no /run/sshd and no
//! /run/netns, whatever earlier runs or concurrent tests left in the real
//! /run. Namespaces it creates there are visible only to it. Needs root,
//! unshare (util-linux) and OpenSSH; fails, never skips, when they are
//! missing.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};

use support::testbed::script_path;
use support::ClientKey;

/// Runs in the private mount namespace. `$1` is the testbed script, `$2` a
/// work dir, `$3` the authorized key. Each step prints one line
/// `STEP NAME RC NAMESPACES OWNER_DIR_EXISTS`; a step's stderr goes to
/// `$2/NAME.err`. Whatever happens, every bed it made is torn down.
const DRIVER: &str = r#"
set -u
script=$1 w=$2 key=$3
mount -t tmpfs -o mode=0755 nt-fresh-run /run || { echo "MOUNT-FAILED"; exit 90; }
cleanup() {
    for d in "$w"/bed*; do [ -d "$d" ] && bash "$script" down "$d" >/dev/null 2>&1; done
}
trap cleanup EXIT
step() {
    local name=$1 rc n owner
    shift
    "$@" >"$w/$name.out" 2>"$w/$name.err" </dev/null
    rc=$?
    n=$(ip netns list 2>/dev/null | grep -cE '^nt[a-z0-9]+-(fab|cp|n[0-9]+)( |$)')
    if [ -d /run/nodetunnel-testbed ]; then owner=yes; else owner=no; fi
    echo "STEP $name $rc $n $owner"
}
tb() { bash "$script" "$@"; }
export NT_NODES=1 NT_AUTHORIZED_KEY="$key"

step gc-fresh tb gc
step purge-fresh tb purge
step down-nobed tb down "$w/nobed"
step stop-node-nobed tb stop-node "$w/nobed" 1
step unknown tb bogus
NT_PREFIX=ntfresha NT_OWNER_PID=$$ step up tb up "$w/bed1"
step stop-node tb stop-node "$w/bed1" 1
step start-node tb start-node "$w/bed1" 1
step bad-index tb stop-node "$w/bed1" 7
step link-down tb link-down "$w/bed1" 1
step link-up tb link-up "$w/bed1" 1
step gc-keeps-owned tb gc
step down tb down "$w/bed1"
step down-again tb down "$w/bed1"
# A bed whose owner is gone, as after a crashed test run.
sleep 600 &
owner=$!
NT_PREFIX=ntfreshb NT_OWNER_PID=$owner step up-orphan tb up "$w/bed2"
kill "$owner"
wait "$owner" 2>/dev/null
step gc-orphan tb gc
# A bed whose owner lives: purge takes it all the same.
NT_PREFIX=ntfreshc NT_OWNER_PID=$$ step up-owned tb up "$w/bed3"
step purge tb purge
# An unexpected failure (not one of the script's own checks) names the
# command that failed.
NT_PREFIX=ntfreshd NT_OWNER_DIR=/proc/nt-no-such-dir/owners step up-unwritable tb up "$w/bed4"
"#;

#[derive(Debug)]
struct Step {
    rc: i32,
    namespaces: usize,
    owner_dir: bool,
    stderr: String,
}

fn run_driver(work: &Path, key: &ClientKey) -> Result<BTreeMap<String, Step>> {
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "bash",
            "-c",
            DRIVER,
            "driver",
        ])
        .arg(script_path())
        .arg(work)
        .arg(&key.public_line)
        .stdin(Stdio::null())
        .output()
        .context("running unshare (util-linux) as root")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && !stdout.contains("MOUNT-FAILED"),
        "the fresh-machine driver failed ({}): stdout {stdout:?} stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut steps = BTreeMap::new();
    for line in stdout.lines() {
        let Some(rest) = line.strip_prefix("STEP ") else {
            continue;
        };
        let f: Vec<&str> = rest.split(' ').collect();
        let [name, rc, n, owner] = f[..] else {
            bail!("malformed driver line {line:?}");
        };
        let stderr = std::fs::read_to_string(work.join(format!("{name}.err")))
            .with_context(|| format!("reading the stderr of step {name}"))?;
        steps.insert(
            name.to_owned(),
            Step {
                rc: rc.parse()?,
                namespaces: n.parse()?,
                owner_dir: owner == "yes",
                stderr,
            },
        );
    }
    Ok(steps)
}

#[test]
fn every_subcommand_works_from_a_fresh_machine() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "needs root (mount namespace, network namespaces, sshd); run the tests as root, as CI does"
    );
    support::require_sshd(Path::new(support::sshd::SSHD_PATH))?;
    let tmp = tempfile::Builder::new().prefix("nt-fresh-").tempdir()?;
    let key = ClientKey::generate(tmp.path())?;
    let steps = run_driver(tmp.path(), &key)?;
    let step = |name: &str| -> &Step {
        steps
            .get(name)
            .unwrap_or_else(|| panic!("the driver did not run step {name}: {steps:#?}"))
    };
    let ok = |name: &str, namespaces: usize, owner_dir: bool| {
        let s = step(name);
        assert_eq!(s.rc, 0, "{name} must succeed: {s:#?}");
        assert_eq!(s.namespaces, namespaces, "namespaces after {name}: {s:#?}");
        assert_eq!(s.owner_dir, owner_dir, "owner dir after {name}: {s:#?}");
    };
    let fails_saying = |name: &str, words: &str| {
        let s = step(name);
        assert_eq!(s.rc, 1, "{name} must fail with exit 1: {s:#?}");
        assert!(
            s.stderr.contains("testbed.sh: error:") && s.stderr.contains(words),
            "{name} must say why ({words:?}): {s:#?}"
        );
    };

    // Nothing there yet: gc and purge have nothing to do, and say nothing
    // alarming (the bug: gc exited 1 without a word when the owner dir was
    // missing).
    ok("gc-fresh", 0, false);
    assert!(
        step("gc-fresh").stderr.is_empty(),
        "{:#?}",
        step("gc-fresh")
    );
    ok("purge-fresh", 0, false);
    ok("down-nobed", 0, false);
    assert!(step("down-nobed").stderr.contains("nothing to do"));
    fails_saying("stop-node-nobed", "holds no testbed");
    fails_saying("unknown", "unknown command 'bogus'");

    // A bed's whole life, from the fresh state.
    ok("up", 3, true);
    assert!(step("up").stderr.contains("up: 1 node(s), prefix ntfresha"));
    ok("stop-node", 3, true);
    ok("start-node", 3, true);
    fails_saying("bad-index", "node index must be 1..1, got '7'");
    ok("link-down", 3, true);
    ok("link-up", 3, true);
    ok("gc-keeps-owned", 3, true);
    ok("down", 0, true);
    ok("down-again", 0, true);

    // gc takes a bed whose owner died; purge takes every bed and the owner
    // directory.
    ok("up-orphan", 3, true);
    ok("gc-orphan", 0, true);
    assert!(step("gc-orphan")
        .stderr
        .contains("gc: removing leftover testbed ntfreshb"));
    ok("up-owned", 3, true);
    ok("purge", 0, false);
    assert!(step("purge")
        .stderr
        .contains("purge: removing testbed ntfreshc"));

    // A command failing where the script has no check of its own: the
    // error names the command and keeps the command's own stderr.
    let s = step("up-unwritable");
    assert_eq!(s.rc, 1, "{s:#?}");
    assert!(
        s.stderr.contains("command failed with exit status 1")
            && s.stderr.contains("mkdir -p \"$OWNER_DIR\"")
            && s.stderr.contains("No such file or directory"),
        "{s:#?}"
    );
    assert_eq!(s.namespaces, 0, "a failed up leaves nothing: {s:#?}");
    Ok(())
}
