"""The `negmerge` client commands (jobs, models, datasets, config): the REST API from a
terminal, through app.client.ServiceClient. Attached to the `negmerge` command through the
`negmerge.commands` entry-point group, like `negmerge admin`."""
