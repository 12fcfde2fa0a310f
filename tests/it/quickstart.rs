//! README's "run it" command, end to end, as a newcomer runs it.

use std::process::Command;

use crate::support::*;

#[test]
fn ca_quickstart_script_issues_a_verifiable_svid() {
    let _heavy = crate::support::heavy();
    require_tool("openssl");
    require_tool("curl");
    let port = free_port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/ca-quickstart.sh");
    let out = run(Command::new("bash")
        .arg(script)
        .env("MESHGATE_BIN", crate::support::meshgate_bin())
        .env("MESHGATE_CA_PORT", port.to_string()));
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("chain:      valid"), "{shown}");
    assert!(shown.contains("svid.pem: OK"), "{shown}");
    assert!(shown.contains("\"error\":\"token_used\""), "{shown}");
    assert!(shown.contains("event=\"svid.issued\""), "{shown}");
    assert!(shown.contains("event=\"svid.refused\""), "{shown}");
}
