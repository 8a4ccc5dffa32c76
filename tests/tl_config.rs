//! Runs the built `tl-config` binary against temporary configuration directories.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Run {
    code: i32,
    out: String,
    err: String,
}

fn tl(dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_tl-config"))
        .arg("--config-dir")
        .arg(dir)
        .args(args)
        .env_remove("VSM_CONFIG_DIR")
        .output()
        .expect("run tl-config");
    Run {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let r = tl(dir, args);
    assert_eq!(r.code, 0, "tl-config {args:?} failed:\n{}", r.err);
    r.out
}

fn read(dir: &Path, file: &str) -> String {
    fs::read_to_string(dir.join(file)).unwrap_or_default()
}

/// Every file of a directory with its bytes, to prove nothing was written.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.unwrap().path()).map(|p| (p.clone(), fs::read(&p).unwrap())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn write_secret(dir: &Path) {
    fs::write(dir.join("ha.key"), [42u8; 32]).unwrap();
}

#[test]
fn set_get_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    assert_eq!(ok(dir, &["/HA/port"]), "9001\n", "unset key prints its default");
    ok(dir, &["/HA/port=9100"]);
    assert_eq!(ok(dir, &["/HA/port"]), "9100\n");
    assert_eq!(read(dir, "ha.toml"), "[HA]\nport = 9100\n");
    ok(dir, &["/HA/sync_timeout=1500ms", "/vsmserver/max_sessions_per_user=0"]);
    assert_eq!(ok(dir, &["/HA/sync_timeout", "/vsmserver/max_sessions_per_user"]), "1500ms\n0\n");
    assert_eq!(read(dir, "vsmserver.toml"), "[vsmserver]\nmax_sessions_per_user = 0\n");
}

#[test]
fn several_keys_in_one_call_with_bool_and_lists() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_secret(dir);
    ok(
        dir,
        &[
            "/HA/enabled=1",
            "/HA/nodes=tlha-primary tlha-secondary",
            "/subclusters/default/agents=agent1.example.com agent2.example.com",
        ],
    );
    assert_eq!(read(dir, "ha.toml"), "[HA]\nenabled = true\nnodes = [\"tlha-primary\", \"tlha-secondary\"]\n");
    assert_eq!(
        read(dir, "cluster.toml"),
        "[subclusters.default]\nagents = [\"agent1.example.com\", \"agent2.example.com\"]\n"
    );
    assert_eq!(ok(dir, &["/HA/enabled", "/HA/nodes"]), "true\ntlha-primary tlha-secondary\n");
    ok(dir, &["/HA/enabled=No"]);
    assert_eq!(ok(dir, &["/HA/enabled"]), "false\n");
    assert!(read(dir, "ha.toml").contains("enabled = false\n"));
}

#[test]
fn enabling_ha_without_secret_tells_how_to_create_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let r = tl(dir, &["/HA/enabled=yes", "/subclusters/default/agents=agent1.example.com"]);
    assert_eq!(r.code, 1, "{}", r.err);
    assert!(r.err.contains("head -c 32 /dev/urandom >"), "{}", r.err);
    assert!(r.err.contains("nothing was written"), "{}", r.err);
    assert!(snapshot(dir).is_empty());
}

#[test]
fn loopback_agents_are_refused_with_ha() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_secret(dir);
    // The built-in default subcluster is 127.0.0.1, so enabling HA alone is refused.
    let r = tl(dir, &["/HA/enabled=true"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("agent 127.0.0.1 is a loopback address"), "{}", r.err);
    assert!(r.err.contains("unique host name or address"), "{}", r.err);
}

#[test]
fn aliases_both_ways() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let r = tl(dir, &["/vsmserver/HA/port=9200"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.err.contains("alias"), "{}", r.err);
    assert_eq!(read(dir, "ha.toml"), "[HA]\nport = 9200\n");
    assert_eq!(ok(dir, &["/vsmserver/HA/port", "/HA/port"]), "9200\n9200\n");

    fs::write(dir.join("vsmserver.toml"), "[vsmserver.subclusters.eng]\nagents = [\"a1\"]\n").unwrap();
    assert_eq!(ok(dir, &["/subclusters/eng/agents"]), "a1\n");
    ok(dir, &["/subclusters/eng/agents=a2"]);
    assert_eq!(read(dir, "vsmserver.toml"), "[vsmserver.subclusters.eng]\n");
    assert_eq!(read(dir, "cluster.toml"), "[subclusters.eng]\nagents = [\"a2\"]\n");
    assert_eq!(ok(dir, &["/vsmserver/subclusters/eng/agents"]), "a2\n");
}

#[test]
fn list_and_recursive_list() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(dir, &["/subclusters/eng/agents=a1 a2", "/subclusters/eng/groups=eng", "/agents/weights/a1=200"]);
    let out = ok(dir, &["-a", "/subclusters/eng"]);
    assert_eq!(out, "agents = a1 a2\nusers =\ngroups = eng\nmax_users_per_agent = 0\n");
    let out = ok(dir, &["-a", "/agents"]);
    assert_eq!(out, "draining =\nweights/\n");
    let out = ok(dir, &["-Ra", "/"]);
    assert!(out.contains("subclusters/\n    eng/\n        agents = a1 a2\n"), "{out}");
    assert!(out.contains("agents/\n    draining =\n    weights/\n        a1 = 200\nvsmserver/\n"), "{out}");
    assert!(!out.contains("default/"), "configured subclusters replace the built-in one:\n{out}");
    assert_eq!(ok(dir, &["-a", "/vsmserver/HA"]), ok(dir, &["-a", "/HA"]));
}

#[test]
fn eval_output_quotes_for_the_shell() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(dir, &["/vsmagent/session_command=Xvnc -desktop it's{user}"]);
    let out = ok(dir, &["-e", "CMD=/vsmagent/session_command", "-e", "PORT=/vsm/vsm_agent_port"]);
    assert_eq!(out, "CMD='Xvnc -desktop it'\\''s{user}'\nPORT='904'\n");
    let out = ok(dir, &["-x", "-e", "CMD=/vsmagent/session_command"]);
    assert!(out.starts_with("export CMD="), "{out}");
    // The shell gets back exactly the value.
    let sh = Command::new("sh").arg("-c").arg(format!("{out}printf '%s' \"$CMD\"")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&sh.stdout), "Xvnc -desktop it's{user}");
}

#[test]
fn delete_returns_to_default() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(dir, &["/vsmagent/display_max=100", "/vsmagent/listen_port=905"]);
    ok(dir, &["-d", "/vsmagent/display_max"]);
    assert_eq!(ok(dir, &["/vsmagent/display_max", "/vsmagent/listen_port"]), "2000\n905\n");
    assert_eq!(read(dir, "vsmagent.toml"), "[vsmagent]\nlisten_port = 905\n");
    let r = tl(dir, &["-d", "/vsmagent/nope"]);
    assert_eq!(r.code, 1);
}

#[test]
fn comments_preserved_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let original = concat!(
        "# HA settings for the pair   (odd  spacing kept)\n",
        "[HA]\n",
        "# is it on?\n",
        "enabled    =   false   # off for now\n",
        "nodes = [ \"tlha-primary\",\"tlha-secondary\" ]  # both nodes\n",
        "\n",
        "# peer link\n",
        "port = 9001 # default\n",
    );
    fs::write(dir.join("ha.toml"), original).unwrap();
    ok(dir, &["/HA/port=9500", "/HA/sync=async"]);
    let now = read(dir, "ha.toml");
    let old_lines: Vec<&str> = original.lines().collect();
    let new_lines: Vec<&str> = now.lines().collect();
    assert_eq!(new_lines.len(), old_lines.len() + 1, "{now}");
    for (i, (o, n)) in old_lines.iter().zip(&new_lines).enumerate() {
        if o.starts_with("port") {
            assert_eq!(*n, "port = 9500 # default");
        } else {
            assert_eq!(o, n, "line {} changed", i + 1);
        }
    }
    assert_eq!(new_lines.last(), Some(&"sync = \"async\""));
}

#[test]
fn unknown_key_with_suggestion() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let r = tl(dir, &["/HA/enable"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("unknown key /HA/enable (did you mean /HA/enabled?)"), "{}", r.err);
    let r = tl(dir, &["/vsmagent/master_hostnme=tlha"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("did you mean /vsmagent/master_hostname?"), "{}", r.err);
    assert!(snapshot(dir).is_empty());
}

#[test]
fn bad_values_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let r = tl(dir, &["/HA/port=70000"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("/HA/port: bad value \"70000\": expected an integer from 1 to 65535"), "{}", r.err);
    let r = tl(dir, &["/HA/enabled=maybe"]);
    assert!(r.err.contains("expected a boolean (true/false, yes/no, 1/0)"), "{}", r.err);
    let r = tl(dir, &["/vsmagent/session_command=Xvnc {home}"]);
    assert!(r.err.contains("unknown placeholder {home}"), "{}", r.err);
    // The same message as the loader, for a bad value already in a file.
    fs::write(dir.join("ha.toml"), "[HA]\nport = 70000\n").unwrap();
    let r = tl(dir, &["--check"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("ha.toml:2: /HA/port: bad value 70000: expected an integer from 1 to 65535"), "{}", r.err);
    let r = tl(dir, &["/HA/port"]);
    assert_eq!(r.code, 1);
}

#[test]
fn key_defined_in_two_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fs::write(dir.join("ha.toml"), "[HA]\nport = 9001\n").unwrap();
    fs::write(dir.join("vsmserver.toml"), "[vsmserver.HA]\nport = 9002\n").unwrap();
    let r = tl(dir, &["--check"]);
    assert_eq!(r.code, 1, "{}", r.err);
    assert!(r.err.contains("/HA/port is defined twice"), "{}", r.err);
    assert!(r.err.contains("ha.toml:2") && r.err.contains("vsmserver.toml:2"), "{}", r.err);
}

#[test]
fn exit_status_counts_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let r = tl(dir, &["/nope/a", "/HA/port", "/nope/b", "/nope/c"]);
    assert_eq!(r.code, 3);
    assert_eq!(r.out, "9001\n");
    let many: Vec<String> = (0..300).map(|i| format!("/nope/k{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(tl(dir, &many).code, 255);
    let r = tl(dir, &["/HA/port=0", "/HA/sync=never", "/vsm/vnc_port_base=x"]);
    assert_eq!(r.code, 3, "{}", r.err);
}

#[test]
fn all_or_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(dir, &["/HA/port=9100"]);
    let before = snapshot(dir);
    let r = tl(dir, &["/HA/port=9200", "/vsmserver/listen_port=9300", "/HA/sync=never"]);
    assert_eq!(r.code, 1);
    assert_eq!(snapshot(dir), before);
    // A cross-key rule broken by the combination also writes nothing.
    let r = tl(dir, &["/vsmserver/listen_port=9300", "/vsmagent/display_min=3000"]);
    assert_eq!(r.code, 1, "{}", r.err);
    assert_eq!(snapshot(dir), before);
}

#[test]
fn missing_dir_is_an_error_for_reads_and_created_by_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("etc/vsm");
    let r = tl(&dir, &["/HA/port"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("does not exist"), "{}", r.err);
    assert_eq!(tl(&dir, &["--check"]).code, 1);
    ok(&dir, &["/HA/port=9100"]);
    assert_eq!(ok(&dir, &["/HA/port"]), "9100\n");
}

#[test]
fn config_dir_from_environment() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("vsm.toml"), "[vsm]\nvnc_port_base = 6000\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tl-config"))
        .arg("/vsm/vnc_port_base")
        .env("VSM_CONFIG_DIR", tmp.path())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "6000\n");
}

#[test]
fn help_shows_examples() {
    let out = Command::new(env!("CARGO_BIN_EXE_tl-config")).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tl-config -Ra /"), "{text}");
    assert!(text.contains("'/HA/nodes=tlha-primary tlha-secondary'"), "{text}");
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

#[test]
fn sample_configurations_pass_check() {
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    for name in ["standalone", "ha-primary", "ha-secondary", "agent"] {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(&samples.join(name), tmp.path());
        if name.starts_with("ha-") {
            // The samples name a secret relative to the configuration directory; without it
            // the check must fail and say how to create it.
            let r = tl(tmp.path(), &["--check"]);
            assert_eq!(r.code, 1, "{name}: {}", r.err);
            assert!(r.err.contains("head -c 32 /dev/urandom"), "{name}: {}", r.err);
            write_secret(tmp.path());
        }
        let r = tl(tmp.path(), &["--check"]);
        assert_eq!(r.code, 0, "{name}: {}", r.err);
    }
    // Both masters have the same cluster configuration.
    let digest = |name: &str| {
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(&samples.join(name), tmp.path());
        write_secret(tmp.path());
        vsm::config::load(tmp.path()).unwrap().digest_cluster()
    };
    assert_eq!(digest("ha-primary"), digest("ha-secondary"));
}

fn sample(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hconf").join(rel)
}

#[test]
fn paths_are_case_insensitive() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let r = tl(dir, &["/ha/PORT=9300", "/VSMSERVER/Max_Sessions_Per_User=3"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(!r.err.contains("alias"), "a case difference is not an alias: {}", r.err);
    assert_eq!(read(dir, "ha.toml"), "[HA]\nport = 9300\n");
    assert_eq!(ok(dir, &["/HA/port", "/Ha/Port", "/vsmserver/ha/port"]), "9300\n9300\n9300\n");
    assert_eq!(ok(dir, &["/vsmserver/max_sessions_per_user"]), "3\n");
    assert_eq!(ok(dir, &["-a", "/vsmagent"]), ok(dir, &["-a", "/VsmAgent"]));
}

#[test]
fn compound_durations() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(dir, &["/vsmserver/reconcile_interval=1m30s", "/HA/tombstone_retention=1d12h"]);
    assert_eq!(ok(dir, &["/vsmserver/reconcile_interval", "/HA/tombstone_retention"]), "90s\n36h\n");
    let r = tl(dir, &["/vsmserver/reconcile_interval=30s1m"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("1m30s"), "the expectation shows the syntax: {}", r.err);
}

#[test]
fn a_key_of_a_missing_subcluster_is_no_such_parameter() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(dir, &["/subclusters/eng/agents=a1 a2"]);
    let r = tl(dir, &["/subclusters/nosuch/agents"]);
    assert_eq!((r.code, r.out.as_str()), (1, ""), "{}", r.err);
    assert!(r.err.contains("/subclusters/nosuch/agents: no such parameter"), "{}", r.err);
    assert!(r.err.contains("subclusters: eng"), "{}", r.err);
    let r = tl(dir, &["-e", "X=/subclusters/nosuch/users"]);
    assert_eq!(r.code, 1, "{}", r.err);
    // A weight of an agent that is in a subcluster has its default; of another host, none.
    assert_eq!(ok(dir, &["/agents/weights/a1"]), "100\n");
    let r = tl(dir, &["/agents/weights/elsewhere"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("not an agent of any subcluster"), "{}", r.err);
}

#[test]
fn suggestions_stay_in_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let r = tl(dir, &["/vsmserver/unbind_ports_at_login"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("unknown key /vsmserver/unbind_ports_at_login"), "{}", r.err);
    assert!(!r.err.contains("did you mean"), "no nonsense suggestion: {}", r.err);
    assert!(r.err.contains("ThinLinc parameter with no vsm equivalent"), "{}", r.err);
    let r = tl(dir, &["/vsmserver/unbind_ports_at_login=true"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("no vsm equivalent"), "{}", r.err);
    let r = tl(dir, &["/vsmserver/max_sesions_per_user"]);
    assert!(r.err.contains("did you mean /vsmserver/max_sessions_per_user?"), "{}", r.err);
}

#[test]
fn export_a_folder_for_the_shell() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(dir, &["/vsm/vnc_port_base=6000"]);
    let out = ok(dir, &["-E", "/vsm"]);
    assert_eq!(
        out,
        "vsm_server_port='9000'\nvsm_agent_port='904'\nvnc_port_base='6000'\nvnc_socket_dir='/run/vsmagent/sessions'\nsecret_file='cluster.key'\n"
    );
    let out = ok(dir, &["-x", "-E", "/VSM"]);
    assert!(out.starts_with("export vsm_server_port='9000'\n"), "{out}");
    let r = tl(dir, &["-E", "/nope"]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("folder not found"), "{}", r.err);
}

#[test]
fn import_a_thinlinc_4_18_site() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_secret(dir);
    let server = sample("4.18/vsmserver.hconf");
    let agent = sample("4.18/vsmagent.hconf");
    let r = tl(dir, &["-i", server.to_str().unwrap(), "-i", agent.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}\n{}", r.out, r.err);
    let get = |k: &str| ok(dir, &[k]).trim_end().to_string();
    assert_eq!(get("/HA/enabled"), "true");
    assert_eq!(get("/HA/nodes"), "tlha-primary.example.com tlha-secondary.example.com");
    assert_eq!(get("/subclusters/Default/agents"), "agent1.example.com agent2.example.com");
    assert_eq!(get("/subclusters/Engineering/groups"), "eng");
    assert_eq!(get("/subclusters/Engineering/max_users_per_agent"), "25");
    assert_eq!(get("/vsmserver/allowed_groups"), "thinlinc-users staff");
    assert_eq!(get("/vsmserver/admin_email"), "ops@example.com oncall@example.com");
    assert_eq!(get("/vsmserver/max_sessions_per_user"), "2");
    assert_eq!(get("/vsmserver/reconcile_interval"), "40s");
    assert_eq!(get("/vsmagent/default_geometry"), "1280x800");
    assert_eq!(get("/vsmagent/master_hostname"), "tlha.example.com");
    // Written to vsm's files under the current names, not the 4.18 ones.
    assert!(read(dir, "ha.toml").contains("[HA]"), "{}", read(dir, "ha.toml"));
    assert!(read(dir, "cluster.toml").contains("[subclusters.Engineering]"));
    // Every parameter not imported is listed with a reason.
    for skipped in [
        "skipped /vsmserver/unbind_ports_at_login",
        "skipped /vsmserver/ram_per_user",
        "skipped /vsmserver/bogomips_per_user",
        "skipped /vsmserver/existing_users_weight",
        "skipped /vsmserver/logging/logfile",
        "skipped /vsmagent/xserver_args",
        "skipped /vsmagent/single_signon",
        "skipped /vsmagent/default_environment/TLSESSION",
    ] {
        let line = r.out.lines().find(|l| l.starts_with(skipped)).unwrap_or_else(|| panic!("{skipped} in\n{}", r.out));
        assert!(line.contains(".hconf:") && line.contains("): "), "place and reason: {line}");
    }
    assert!(r.out.contains("imported /HA/enabled = yes (from /vsmserver/HA/enabled)"), "{}", r.out);
    // The one logging parameter both products have is imported, the rest of the folder listed.
    assert!(r.out.contains("imported /vsmserver/logging/defaultlevel = INFO"), "{}", r.out);
    assert_eq!(tl(dir, &["--check"]).code, 0);
}

#[test]
fn import_a_thinlinc_4_19_site_through_its_mounts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_secret(dir);
    let top = sample("4.19/thinlinc.hconf");
    let r = tl(dir, &["--import", top.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}\n{}", r.out, r.err);
    let get = |k: &str| ok(dir, &[k]).trim_end().to_string();
    assert_eq!(get("/HA/enabled"), "true");
    assert_eq!(get("/subclusters/default/agents"), "agent1.example.com agent2.example.com agent3.example.com");
    assert_eq!(get("/subclusters/Research/users"), "alice bob");
    assert_eq!(get("/agents/draining"), "agent2.example.com");
    assert_eq!(get("/agents/weights/agent1.example.com"), "200");
    assert_eq!(get("/agents/weights/agent3.example.com"), "50");
    assert_eq!(get("/vsmserver/max_sessions_per_user"), "1");
    assert!(r.out.contains("skipped /vsm/tunnel_bind_base"), "{}", r.out);
    assert!(r.out.contains("skipped /vsm/tunnelservices/pulseaudio"), "{}", r.out);
    assert!(r.out.contains("skipped /profiles/default"), "{}", r.out);
    assert!(r.out.contains("skipped /VSMServer/unbind_ports_at_login"), "{}", r.out);
}

#[test]
fn import_is_validated_as_a_whole_and_writes_nothing_on_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(dir, &["/HA/port=9100"]);
    let before = snapshot(dir);
    // A bad value names its line in the file.
    let bad = dir.join("bad.hconf");
    fs::write(&bad, "[/vsmserver]\nlisten_port=9000\nmax_sessions_per_user=lots\n").unwrap();
    let r = tl(dir, &["-i", bad.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.err);
    assert!(r.err.contains("bad.hconf:3: /vsmserver/max_sessions_per_user: bad value \"lots\""), "{}", r.err);
    assert!(r.err.contains("nothing was written"), "{}", r.err);
    // A rule between keys broken by the import as a whole (HA with no secret file).
    let ha = sample("4.18/vsmserver.hconf");
    let r = tl(dir, &["-i", ha.to_str().unwrap(), "/HA/port=9200"]);
    assert!(r.code >= 1, "{}", r.err);
    assert!(r.err.contains("head -c 32 /dev/urandom"), "{}", r.err);
    // A syntax error.
    fs::write(&bad, "[/vsmserver\n").unwrap();
    let r = tl(dir, &["-i", bad.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("bad.hconf:1:"), "{}", r.err);
    fs::remove_file(&bad).unwrap();
    assert_eq!(snapshot(dir), before);
}

#[test]
fn purge_leaves_only_what_was_not_migrated() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("vsmagent.hconf");
    fs::copy(sample("4.18/vsmagent.hconf"), &file).unwrap();
    let r = tl(dir, &["-i", file.to_str().unwrap(), "-p", file.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.out.contains("purged 7 parameter(s)"), "{}", r.out);
    let left = fs::read_to_string(&file).unwrap();
    for gone in ["master_hostname", "allowed_clients", "listen_port", "display_min", "default_geometry"] {
        assert!(!left.contains(gone), "{gone} purged:\n{left}");
    }
    for kept in ["# Sample agent settings", "[/vsmagent]", "xserver_args=", "single_signon=", "TLSESSION=1"] {
        assert!(left.contains(kept), "{kept} kept:\n{left}");
    }
    // Nothing left that vsm sets: a second purge removes nothing.
    assert!(ok(dir, &["-p", file.to_str().unwrap()]).contains("purged 0 parameter(s)"));
}
