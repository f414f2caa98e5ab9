//! `agentledger apikey create | list | revoke`: API keys, managed with the
//! owner role straight against the database, so that the first admin key
//! needs no running server. Each creation and revocation is also recorded
//! on the ledger (`access-api-keys` stream: `ApiKeyCreated`,
//! `ApiKeyRevoked`, never the secret), with who did it.

use std::time::Duration;

use agentledger_api::auth::Role;
use agentledger_eventstore::api_keys::{ApiKey, ApiKeys, NewApiKey, PostgresApiKeys};
use agentledger_eventstore::{
    migrate, Actor, ActorKind, EventStore, ExpectedVersion, Metadata, NewEvent, PostgresEventStore,
    PostgresOptions, StreamId,
};
use anyhow::{bail, Context};
use serde_json::json;

/// The stream recording who created and revoked which key.
pub const ACCESS_STREAM: &str = "access-api-keys";

#[derive(clap::Subcommand)]
pub enum ApikeyCommand {
    /// Create a key; its secret is printed once, alone on the last line.
    Create(CreateArgs),
    /// Every key: id, name, roles, tenant, created, last used, expires, revoked.
    List(ListArgs),
    /// Revoke a key by name or id; every node refuses it within 2 seconds.
    Revoke(RevokeArgs),
}

#[derive(clap::Args)]
pub struct Owner {
    /// The owner role's database (default: DATABASE_URL).
    #[arg(long, env = "AGENTLEDGER_ADMIN_DATABASE_URL", hide_env_values = true)]
    admin_database_url: Option<String>,
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, hide = true)]
    database_url: Option<String>,
    /// Who is acting, as recorded on the ledger (default: the OS user).
    #[arg(long)]
    by: Option<String>,
}

#[derive(clap::Args)]
pub struct CreateArgs {
    /// A unique name, shown as the actor of what the key does.
    #[arg(long)]
    name: String,
    /// viewer, submitter, operator, auditor, admin or agent; repeat for several.
    #[arg(long = "role", required = true)]
    roles: Vec<String>,
    #[arg(long, default_value = "default")]
    tenant: String,
    /// e.g. 90d, 12h, 30m; default: never expires.
    #[arg(long, value_parser = parse_duration)]
    expires_in: Option<Duration>,
    #[command(flatten)]
    owner: Owner,
}

#[derive(clap::Args)]
pub struct ListArgs {
    /// One JSON object per key instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    owner: Owner,
}

#[derive(clap::Args)]
pub struct RevokeArgs {
    /// The key's name or id.
    name_or_id: String,
    #[command(flatten)]
    owner: Owner,
}

/// `90d`, `12h`, `30m`, `45s`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit: use d, h, m or s (e.g. 90d)"))?;
    let (n, unit) = text.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number"))?;
    let seconds = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return Err(format!("{unit:?} is not a unit: use d, h, m or s")),
    };
    if n == 0 {
        return Err("a key that expires at once is useless".into());
    }
    n.checked_mul(seconds)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

impl Owner {
    async fn connect(&self) -> anyhow::Result<(PostgresEventStore, Actor)> {
        let url = self
            .admin_database_url
            .as_deref()
            .or(self.database_url.as_deref())
            .context("AGENTLEDGER_ADMIN_DATABASE_URL (or DATABASE_URL) is not set")?;
        migrate::run(url).await.context("applying migrations")?;
        let store = PostgresEventStore::connect(url, PostgresOptions::default()).await?;
        let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
        let name = self.by.clone().unwrap_or_else(|| user.clone());
        let actor = Actor {
            kind: ActorKind::Human,
            name,
            version: String::new(),
            subject: format!("os:{user}"),
            method: "database_owner".into(),
            role: String::new(),
        };
        Ok((store, actor))
    }
}

/// Records an administrative fact about `key` on the ledger.
async fn record(
    store: &PostgresEventStore,
    actor: &Actor,
    event_type: &str,
    key: &ApiKey,
) -> anyhow::Result<()> {
    let mut metadata = Metadata::new(actor.clone());
    metadata.tenant = key.tenant.clone();
    metadata.owner = actor.identity().to_string();
    let mut event = NewEvent::new(
        event_type,
        json!({
            "key_id": key.key_id,
            "name": key.name,
            "roles": key.roles,
            "tenant": key.tenant,
            "expires_at": key.expires_at,
        }),
        metadata,
    );
    // One record per key and fact, however often the command is retried.
    event.event_id = uuid::Uuid::new_v5(&key.key_id, event_type.as_bytes());
    let stream = StreamId::new(ACCESS_STREAM).expect("a valid stream id");
    match store
        .append(&stream, ExpectedVersion::Any, vec![event])
        .await
    {
        Ok(_) | Err(agentledger_eventstore::StoreError::IdempotencyMismatch { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl ApikeyCommand {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            ApikeyCommand::Create(args) => create(args).await,
            ApikeyCommand::List(args) => list(args).await,
            ApikeyCommand::Revoke(args) => revoke(args).await,
        }
    }
}

async fn create(args: CreateArgs) -> anyhow::Result<()> {
    let mut roles = Vec::new();
    for name in &args.roles {
        let role = Role::parse(name).with_context(|| {
            let known: Vec<&str> = Role::ALL.iter().map(|r| r.as_str()).collect();
            format!("{name:?} is not a role: use {}", known.join(", "))
        })?;
        if !roles.contains(&role.as_str().to_string()) {
            roles.push(role.as_str().to_string());
        }
    }
    let expires_at = args
        .expires_in
        .map(|d| chrono::Duration::from_std(d).map(|d| chrono::Utc::now() + d))
        .transpose()
        .context("the expiry is too far away")?;
    let (store, actor) = args.owner.connect().await?;
    let keys = PostgresApiKeys::new(store.pool().clone());
    let (key, secret) = keys
        .create(NewApiKey {
            name: args.name,
            roles,
            tenant: args.tenant,
            expires_at,
        })
        .await?;
    record(&store, &actor, "ApiKeyCreated", &key).await?;
    println!("created API key {} ({})", key.name, key.key_id);
    println!("  roles:   {}", key.roles.join(", "));
    println!("  tenant:  {}", key.tenant);
    println!(
        "  expires: {}",
        key.expires_at.map_or("never".into(), |t| t.to_rfc3339())
    );
    println!("The secret follows, shown this once; keep it safe:");
    println!("{secret}");
    Ok(())
}

async fn list(args: ListArgs) -> anyhow::Result<()> {
    let (store, _) = args.owner.connect().await?;
    let keys = PostgresApiKeys::new(store.pool().clone()).list().await?;
    if args.json {
        for key in &keys {
            println!("{}", serde_json::to_string(key)?);
        }
        return Ok(());
    }
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map_or("-".to_string(), |t| t.format("%Y-%m-%d %H:%M").to_string())
    };
    println!(
        "{:<36}  {:<20}  {:<24}  {:<12}  {:<16}  {:<16}  {:<16}  {:<16}",
        "id", "name", "roles", "tenant", "created", "last used", "expires", "revoked"
    );
    for key in &keys {
        println!(
            "{:<36}  {:<20}  {:<24}  {:<12}  {:<16}  {:<16}  {:<16}  {:<16}",
            key.key_id,
            key.name,
            key.roles.join(","),
            key.tenant,
            time(Some(key.created_at)),
            time(key.last_used_at),
            time(key.expires_at),
            time(key.revoked_at),
        );
    }
    Ok(())
}

async fn revoke(args: RevokeArgs) -> anyhow::Result<()> {
    let (store, actor) = args.owner.connect().await?;
    let keys = PostgresApiKeys::new(store.pool().clone());
    let Some(key) = keys.revoke(&args.name_or_id).await? else {
        bail!("no API key is named or numbered {:?}", args.name_or_id);
    };
    record(&store, &actor, "ApiKeyRevoked", &key).await?;
    println!(
        "revoked API key {} ({}); every node refuses it within 2 seconds",
        key.name, key.key_id
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_have_a_unit_and_a_positive_length() {
        assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1_800)));
        assert!(parse_duration("90").is_err());
        assert!(parse_duration("0h").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}
