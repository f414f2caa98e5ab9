//! Reading event rows.

use deadpool_postgres::Client;
use tokio_postgres::Row;

use crate::chain::{canonical_from_slice, CanonicalEvent};
use crate::{Page, Position, ReadFrom, RecordedEvent, StoreError, StreamId};

/// A `jsonb` (or `json`) column's JSON text, not parsed.
struct JsonText<'a>(&'a [u8]);

impl<'a> tokio_postgres::types::FromSql<'a> for JsonText<'a> {
    fn from_sql(
        ty: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == tokio_postgres::types::Type::JSONB {
            // jsonb's binary format: a version byte (1), then the text.
            match raw.split_first() {
                Some((1, text)) => Ok(Self(text)),
                _ => Err("unsupported jsonb binary format version".into()),
            }
        } else {
            Ok(Self(raw))
        }
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        matches!(
            *ty,
            tokio_postgres::types::Type::JSONB | tokio_postgres::types::Type::JSON
        )
    }
}

/// The columns of an event row, in the order [`decode`] expects.
pub const EVENT_COLUMNS: &str =
    "global_position, stream_id, stream_version, event_id, event_type, schema_version, \
     payload, metadata, recorded_at, hash_version, prev_hash, hash";

pub(crate) async fn read_all(
    client: &Client,
    from_position: Position,
    limit: usize,
) -> Result<Vec<RecordedEvent>, StoreError> {
    // Never past the low-water mark: see the migration.
    let sql = format!("SELECT {EVENT_COLUMNS} FROM events_read_all($1, $2)");
    let statement = client.prepare_cached(&sql).await?;
    let limit = i32::try_from(limit).unwrap_or(i32::MAX);
    let rows = client
        .query(&statement, &[&to_i64(from_position), &limit])
        .await?;
    rows.iter().map(decode).collect()
}

/// Events in `[from, to]`, `to` being a head read before (all visible).
pub(crate) async fn read_range(
    client: &Client,
    from: Position,
    to: Position,
    limit: usize,
) -> Result<Vec<RecordedEvent>, StoreError> {
    range_rows(client, from, to, limit)
        .await?
        .iter()
        .map(decode)
        .collect()
}

/// The rows of events in `[from, to]`, at most `limit`.
async fn range_rows(
    client: &Client,
    from: Position,
    to: Position,
    limit: usize,
) -> Result<Vec<Row>, StoreError> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE global_position BETWEEN $1 AND $2 \
         ORDER BY global_position LIMIT $3"
    );
    let statement = client.prepare_cached(&sql).await?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    Ok(client
        .query(&statement, &[&to_i64(from), &to_i64(to), &limit])
        .await?)
}

/// [`read_range`] for verification: documents canonical, straight from
/// their JSON text.
pub(crate) async fn read_range_canonical(
    client: &Client,
    from: Position,
    to: Position,
    limit: usize,
) -> Result<Vec<CanonicalEvent>, StoreError> {
    range_rows(client, from, to, limit)
        .await?
        .iter()
        .map(decode_canonical)
        .collect()
}

fn decode_canonical(row: &Row) -> Result<CanonicalEvent, StoreError> {
    decode_with(row, |text: JsonText, corrupt| {
        canonical_from_slice(text.0).map_err(|e| corrupt(format!("stored JSON: {e}")))
    })
}

/// A page from `from` that ends at `limit` events or with the event that
/// brings the documents' wire size to `max_bytes`. Rows are decoded as they
/// arrive; those after the cut still cross the connection and are dropped
/// undecoded (a subscription asks for fewer after a cut).
pub(crate) async fn read_page(
    client: &Client,
    from: ReadFrom<'_>,
    limit: usize,
    max_bytes: usize,
) -> Result<Page, StoreError> {
    use futures::TryStreamExt;

    let rows = match from {
        ReadFrom::All(position) => {
            let sql = format!("SELECT {EVENT_COLUMNS} FROM events_read_all($1, $2)");
            let statement = client.prepare_cached(&sql).await?;
            let limit = i32::try_from(limit).unwrap_or(i32::MAX);
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
                [&to_i64(position), &limit];
            client.query_raw(&statement, params).await?
        }
        ReadFrom::Stream(stream, version) => {
            let statement = client.prepare_cached(&read_stream_sql()).await?;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                [&stream.as_str(), &to_i64(version), &to_i64(limit as u64)];
            client.query_raw(&statement, params).await?
        }
    };
    futures::pin_mut!(rows);
    let mut page = Page::default();
    let mut bytes = 0;
    while let Some(row) = rows.try_next().await? {
        bytes += row.try_get::<_, JsonText>(6)?.0.len() + row.try_get::<_, JsonText>(7)?.0.len();
        page.events.push(decode(&row)?);
        if bytes >= max_bytes && page.events.len() < limit {
            page.cut = true;
            break;
        }
    }
    Ok(page)
}

fn read_stream_sql() -> String {
    format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = $1 AND stream_version >= $2 \
         ORDER BY stream_version LIMIT $3"
    )
}

pub(crate) async fn read_stream(
    client: &Client,
    stream: &StreamId,
    from_version: u64,
    limit: usize,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let statement = client.prepare_cached(&read_stream_sql()).await?;
    let rows = client
        .query(
            &statement,
            &[
                &stream.as_str(),
                &to_i64(from_version),
                &to_i64(limit as u64),
            ],
        )
        .await?;
    rows.iter().map(decode).collect()
}

/// The last event at or below the low-water mark.
pub(crate) async fn head_position(client: &Client) -> Result<Position, StoreError> {
    let statement = client
        .prepare_cached("SELECT events_head_position()")
        .await?;
    let row = client.query_one(&statement, &[]).await?;
    Ok(row.get::<_, i64>(0) as Position)
}

/// Clamps to the `bigint` range; positions and versions never get near it.
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Decodes a row selected with [`EVENT_COLUMNS`].
pub fn decode(row: &Row) -> Result<RecordedEvent, StoreError> {
    decode_with(row, |value, _| Ok(value))
}

/// A row selected with [`EVENT_COLUMNS`], its two documents read as `R`
/// and turned into `D` by `document`.
fn decode_with<'r, R, D>(
    row: &'r Row,
    document: impl Fn(R, &dyn Fn(String) -> StoreError) -> Result<D, StoreError>,
) -> Result<RecordedEvent<D>, StoreError>
where
    R: tokio_postgres::types::FromSql<'r>,
{
    let position: i64 = row.try_get(0)?;
    let corrupt = |reason: String| StoreError::Corrupt {
        position: position as u64,
        reason,
    };
    let hash_of = |i: usize| -> Result<[u8; 32], StoreError> {
        let bytes: &[u8] = row.try_get(i)?;
        bytes
            .try_into()
            .map_err(|_| corrupt(format!("hash of {} bytes", bytes.len())))
    };
    Ok(RecordedEvent {
        global_position: position as Position,
        stream_id: StreamId::new(row.try_get::<_, String>(1)?)
            .map_err(|e| corrupt(e.to_string()))?,
        stream_version: row.try_get::<_, i64>(2)? as u64,
        event_id: row.try_get(3)?,
        event_type: row.try_get(4)?,
        schema_version: row.try_get::<_, i32>(5)? as u32,
        payload: document(row.try_get(6)?, &corrupt)?,
        metadata: document(row.try_get(7)?, &corrupt)?,
        recorded_at: row.try_get(8)?,
        hash_version: row.try_get::<_, i16>(9)? as u16,
        prev_hash: hash_of(10)?,
        hash: hash_of(11)?,
    })
}
