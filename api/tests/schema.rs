//! The committed SDL (`api/schema.graphql`) is the schema the code builds:
//! regenerate it with `agentledger schema > api/schema.graphql`.

#[test]
fn the_committed_schema_matches_the_code() {
    let committed = include_str!("../schema.graphql");
    assert!(
        agentledger_api::sdl() == committed,
        "api/schema.graphql is stale: run `cargo run -- schema > api/schema.graphql`"
    );
}
