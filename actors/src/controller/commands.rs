use super::*;

pub fn list() -> Command {
    Command::List { batch: true }
}

pub fn info(name: &str) -> Result<Command, DialectError> {
    Ok(Command::Info {
        name: AppName::new(name)?,
        batch: true,
    })
}

pub fn provision(
    template: &str,
    name: &str,
    p: &[(String, String)],
) -> Result<Command, DialectError> {
    Ok(Command::Provision {
        template: AppName::new(template)?,
        name: AppName::new(name)?,
        props: props(p)?,
    })
}

pub fn start(name: &str) -> Result<Command, DialectError> {
    Ok(Command::Start {
        name: AppName::new(name)?,
    })
}

pub fn stop(name: &str) -> Result<Command, DialectError> {
    Ok(Command::Stop {
        name: AppName::new(name)?,
    })
}

pub fn destroy(name: &str) -> Result<Command, DialectError> {
    Ok(Command::Destroy {
        name: AppName::new(name)?,
    })
}

pub fn config(name: &str, p: &[(String, String)]) -> Result<Command, DialectError> {
    Ok(Command::Config {
        name: AppName::new(name)?,
        props: props(p)?,
    })
}

pub fn migrate_import(
    remote: &Controller,
    app: &str,
    new_name: &str,
    p: &[(String, String)],
    opts: MigrateOptions,
) -> Result<Command, DialectError> {
    // A `Controller` has public fields, so it may not have come through `FromStr`: re-check.
    let remote: Controller = remote.to_string().parse()?;
    Ok(Command::Migrate {
        remote,
        app: AppName::new(app)?,
        new_name: AppName::new(new_name)?,
        import: true,
        novols: opts.novols,
        nocompress: opts.nocompress,
        props: props(p)?,
        progress_on_stdout: true,
        max_rate: opts.max_rate,
        stage: opts.stage,
        delta: opts.delta,
    })
}

pub fn checksum(name: &str) -> Result<Command, DialectError> {
    Ok(Command::Checksum {
        name: AppName::new(name)?,
    })
}

pub fn grid() -> Command {
    Command::Grid { batch: true }
}

pub fn check_import(
    remote: &Controller,
    app: &str,
    new_name: &str,
) -> Result<Command, DialectError> {
    Ok(Command::MigrateCheck {
        remote: remote.clone(),
        app: AppName::new(app)?,
        new_name: AppName::new(new_name)?,
    })
}
