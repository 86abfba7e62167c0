use super::*;
use dialect::{AppName, Prop};

#[test]
fn secrets_are_redacted_from_shown_command_lines() {
    let cmd = Command::Provision {
        template: AppName::new("MigHelper").unwrap(),
        name: AppName::new("h1").unwrap(),
        props: vec![
            Prop::new("in_ip", "127.0.2.20").unwrap(),
            Prop::new("env", "k_op=deadbeef").unwrap(),
        ],
    };
    let shown = redacted(&cmd);
    assert!(!shown.contains("deadbeef"), "{shown}");
    assert!(shown.contains("in_ip=127.0.2.20"), "{shown}");
    assert!(cmd.to_command_line().contains("deadbeef"));
}
