-- The schema mlflow-dock created before Alembic (create_all of jobs/store.py and
-- imaging/layercache.py at commit 86f9c4b), as postgresql ran it. Frozen: never edit.

CREATE TABLE job_log_lines (
	id SERIAL NOT NULL, 
	job_id VARCHAR(36) NOT NULL, 
	line TEXT NOT NULL, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_job_log_lines_job_id ON job_log_lines (job_id);

CREATE TABLE jobs (
	id VARCHAR(36) NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	dedupe_key VARCHAR(1100), 
	model_name VARCHAR(500) NOT NULL, 
	version VARCHAR(32) NOT NULL, 
	alias VARCHAR(255), 
	depends_on VARCHAR(36), 
	state VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	updated_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	started_at TIMESTAMP WITH TIME ZONE, 
	finished_at TIMESTAMP WITH TIME ZONE, 
	not_before TIMESTAMP WITH TIME ZONE, 
	image VARCHAR(600), 
	digest VARCHAR(100), 
	tags_json TEXT NOT NULL, 
	error TEXT, 
	note TEXT, 
	permanent BOOLEAN NOT NULL, 
	owner VARCHAR(200), 
	lease_expires_at TIMESTAMP WITH TIME ZONE, 
	sbom VARCHAR(700), 
	signature VARCHAR(700), 
	provenance VARCHAR(700), 
	enqueued_at TIMESTAMP WITH TIME ZONE, 
	PRIMARY KEY (id), 
	UNIQUE (dedupe_key), 
	FOREIGN KEY(depends_on) REFERENCES jobs (id)
);

CREATE INDEX ix_jobs_model_name ON jobs (model_name);

CREATE INDEX ix_jobs_state ON jobs (state);

CREATE TABLE locks (
	name VARCHAR(300) NOT NULL, 
	owner VARCHAR(200) NOT NULL, 
	expires_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (name)
);

CREATE TABLE meta (
	key VARCHAR(100) NOT NULL, 
	value TEXT NOT NULL, 
	PRIMARY KEY (key)
);

CREATE TABLE tag_writes (
	id SERIAL NOT NULL, 
	model_name VARCHAR(500) NOT NULL, 
	version VARCHAR(32) NOT NULL, 
	tag VARCHAR(250) NOT NULL, 
	value TEXT, 
	revision INTEGER NOT NULL, 
	attempts INTEGER NOT NULL, 
	not_before TIMESTAMP WITH TIME ZONE, 
	last_error TEXT, 
	PRIMARY KEY (id), 
	UNIQUE (model_name, version, tag)
);

CREATE TABLE deliveries (
	delivery_id VARCHAR(200) NOT NULL, 
	job_id VARCHAR(36) NOT NULL, 
	received_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (delivery_id), 
	FOREIGN KEY(job_id) REFERENCES jobs (id)
);

CREATE TABLE job_attempts (
	id SERIAL NOT NULL, 
	job_id VARCHAR(36) NOT NULL, 
	attempt INTEGER NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	outcome VARCHAR(16) NOT NULL, 
	cause VARCHAR(32), 
	finished_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	bytes_uploaded BIGINT NOT NULL, 
	bytes_mounted BIGINT NOT NULL, 
	bytes_present BIGINT NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(job_id) REFERENCES jobs (id)
);

CREATE INDEX ix_job_attempts_job_id ON job_attempts (job_id);

CREATE TABLE job_steps (
	id SERIAL NOT NULL, 
	job_id VARCHAR(36) NOT NULL, 
	attempt INTEGER NOT NULL, 
	name VARCHAR(32) NOT NULL, 
	started_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	seconds FLOAT, 
	outcome VARCHAR(16) NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(job_id) REFERENCES jobs (id)
);

CREATE INDEX ix_job_steps_job_id ON job_steps (job_id);

CREATE TABLE native_layers (
	host VARCHAR(255) NOT NULL, 
	key VARCHAR(64) NOT NULL, 
	digest VARCHAR(100) NOT NULL, 
	diff_id VARCHAR(100) NOT NULL, 
	size INTEGER NOT NULL, 
	repository VARCHAR(512) NOT NULL, 
	label VARCHAR(1024) NOT NULL, 
	updated TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (host, key)
);

