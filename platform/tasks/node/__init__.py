"""What runs on a node: the node agent, its cold-start path (node cache and worker pool), the
stage assignment read from Postgres, the file cache of http(s) models, and stage 0's request
loop."""
