-- Agent metrics per tenant (issue #12): every read is confined to the
-- caller's tenant, and decision counts, latencies and ethics scores are
-- reads too. Rows kept so far were all of the default tenant's workflows
-- unless other tenants already submitted; `agentledger rebuild
-- agent_metrics` recomputes them exactly from the events.
ALTER TABLE agent_metrics ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE agent_metrics ALTER COLUMN tenant DROP DEFAULT;
ALTER TABLE agent_metrics DROP CONSTRAINT agent_metrics_pkey;
ALTER TABLE agent_metrics ADD CONSTRAINT agent_metrics_pkey PRIMARY KEY (tenant, agent, bucket);
