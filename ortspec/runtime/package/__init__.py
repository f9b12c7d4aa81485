"""A deployment package on disk: its manifest, schema, external data and graph names."""
