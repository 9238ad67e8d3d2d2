//! rumqttd started from a TOML file given as the only argument; its log (warnings and above, or
//! what `RUST_LOG` asks for) on stderr.

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: rumqttd <config.toml>");
        std::process::exit(2);
    };
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "rumqttd=warn".into()),
        )
        .init();
    let config: rumqttd::Config = config::Config::builder()
        .add_source(config::File::new(&path, config::FileFormat::Toml))
        .build()
        .and_then(config::Config::try_deserialize)
        .unwrap_or_else(|err| {
            eprintln!("rumqttd: {path}: {err}");
            std::process::exit(2);
        });
    if let Err(err) = rumqttd::Broker::new(config).start() {
        eprintln!("rumqttd: {err}");
        std::process::exit(1);
    }
}
