//! The configuration reference (`docs/configuration.md`), generated from
//! the binaries' own clap definitions: the flags, their environment
//! variables, defaults and help are what `--help` prints. A test checks the
//! file is current.

use clap::CommandFactory;

/// The Markdown of `docs/configuration.md`.
pub fn markdown() -> String {
    let mut out = String::from(
        "# Configuration\n\n\
         Every setting is a flag and an environment variable (a flag wins). This page is\n\
         generated from the binaries' definitions, so it says what `--help` says; regenerate it\n\
         with `BERTH_UPDATE_DOCS=1 cargo test -p berth-tests --test it docs::the_configuration_reference_is_current`\n\
         (the test fails while it is out of date). The CLI's flags are in [cli.md](cli.md).\n",
    );
    section(&mut out, berth_dispatcher::Config::command());
    section(&mut out, berth_agent_server::Config::command());
    out.push_str(
        "\nThe node reaches Docker through `DOCKER_HOST` or the local socket; the API version is\n\
         negotiated.\n",
    );
    out
}

fn section(out: &mut String, cmd: clap::Command) {
    out.push_str(&format!("\n## `{}`\n\n", cmd.get_name()));
    if let Some(about) = cmd.get_about() {
        out.push_str(&format!("{about}.\n\n"));
    }
    out.push_str("| flag | env | default | meaning |\n|---|---|---|---|\n");
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if arg.is_hide_set() || id == "help" || id == "version" {
            continue;
        }
        let Some(long) = arg.get_long() else {
            continue;
        };
        let env = arg
            .get_env()
            .map(|e| format!("`{}`", e.to_string_lossy()))
            .unwrap_or_default();
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let default = match defaults.join(",").as_str() {
            // Computed where it runs (a host name): the help says how.
            _ if arg.is_hide_default_value_set() => "computed".to_string(),
            "" => "unset".to_string(),
            d => format!("`{d}`"),
        };
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        let help = help
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .replace('|', "\\|");
        out.push_str(&format!("| `--{long}` | {env} | {default} | {help} |\n"));
    }
}
