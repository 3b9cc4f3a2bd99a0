//! The real CLI's command line, as far as the fake reads it.

/// Flags of the real CLI that take a value.
pub(crate) const VALUE_FLAGS: &[&str] = &[
    "--input-format",
    "--output-format",
    "--model",
    "--append-system-prompt",
    "--system-prompt",
    "--resume",
    "-r",
    "--session-id",
    "--permission-mode",
    "--max-turns",
    "--allowedTools",
    "--allowed-tools",
    "--disallowedTools",
    "--disallowed-tools",
    "--mcp-config",
    "--add-dir",
    "--settings",
    "--fallback-model",
    "--permission-prompt-tool",
];

/// Flags of the real CLI that take no value.
pub(crate) const BOOL_FLAGS: &[&str] = &[
    "-p",
    "--print",
    "--verbose",
    "--continue",
    "-c",
    "--dangerously-skip-permissions",
    "--include-partial-messages",
    "--replay-user-messages",
    "--debug",
    "--strict-mcp-config",
];

#[derive(Debug, Default)]
pub(crate) struct Args {
    pub(crate) print: bool,
    pub(crate) verbose: bool,
    pub(crate) input_format: String,
    pub(crate) output_format: String,
    pub(crate) model: String,
    pub(crate) resume: Option<String>,
    pub(crate) session_id: Option<String>,
    pub(crate) permission: crate::permission::Policy,
    pub(crate) mcp_config: Option<String>,
}

pub(crate) fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        input_format: "text".into(),
        output_format: "text".into(),
        model: "claude-sonnet-4-6".into(),
        ..Args::default()
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if BOOL_FLAGS.contains(&flag.as_str()) {
            match flag.as_str() {
                "-p" | "--print" => args.print = true,
                "--verbose" => args.verbose = true,
                _ => {}
            }
        } else if VALUE_FLAGS.contains(&flag.as_str()) {
            let value = match inline {
                Some(v) => v,
                None => it
                    .next()
                    .ok_or_else(|| format!("error: option '{flag}' argument missing"))?,
            };
            match flag.as_str() {
                "--input-format" => args.input_format = value,
                "--output-format" => args.output_format = value,
                "--model" => args.model = value,
                "--resume" | "-r" => args.resume = Some(value),
                "--session-id" => args.session_id = Some(value),
                "--permission-prompt-tool" => args.permission.prompt_tool = value == "stdio",
                "--permission-mode" => args.permission.mode = value,
                "--mcp-config" => args.mcp_config = Some(value),
                "--allowedTools" | "--allowed-tools" => args.permission.allowed.push(value),
                "--disallowedTools" | "--disallowed-tools" => {
                    args.permission.disallowed.push(value)
                }
                _ => {}
            }
        } else if flag.starts_with('-') {
            return Err(format!("error: unknown option '{flag}'"));
        } else {
            return Err(format!(
                "error: a prompt argument ('{arg}') cannot be combined with --input-format=stream-json"
            ));
        }
    }
    if !args.print {
        return Err("error: fake-claude only supports --print mode".into());
    }
    if args.input_format != "stream-json" || args.output_format != "stream-json" {
        return Err(
            "error: fake-claude needs --input-format stream-json --output-format stream-json"
                .into(),
        );
    }
    if !args.verbose {
        return Err(
            "Error: When using --print, --output-format=stream-json requires --verbose".into(),
        );
    }
    Ok(args)
}
