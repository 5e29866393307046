"""What the admin console reads: the cluster's nodes, devices and live groups, a tenant's
functions with their invocations, an invocation's timeline (docs/console.md). Read-only; the
console's writes (prices) go through the owning domain's service."""
