-- The catalog and the jobs service each own their tables (both have an `outbox`), so each gets its own
-- database; POSTGRES_DB creates tuneforge_catalog, this adds the other on the volume's first start.
CREATE DATABASE tuneforge_jobs;
