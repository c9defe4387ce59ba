mod support;
use support::*;
#[test]
fn panics_with_bed() {
    let tmp = tempfile::tempdir().unwrap();
    let key = ClientKey::generate(tmp.path()).unwrap();
    let bed = Testbed::up(2, &key.public_line).unwrap();
    let _s = Sshd::start(Default::default()).unwrap();
    let _srv = bed
        .spawn_in_ns(
            &bed.node(1).ns,
            support::servers::ServerKind::echo("10.244.1.10:1".parse().unwrap()),
        )
        .unwrap();
    std::fs::write("/tmp/scratch_prefix", bed.prefix()).unwrap();
    eprintln!("LOG1={:?} LOG2={:?}", _s.log(), bed.sshd_log(1));
    panic!("deliberate");
}
#[test]
fn killed_with_bed() {
    if std::env::var("SCRATCH_KILL").is_err() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let key = ClientKey::generate(tmp.path()).unwrap();
    let bed = Testbed::up(2, &key.public_line).unwrap();
    std::fs::write("/tmp/scratch_prefix2", bed.prefix()).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL).unwrap();
}
