"""Pure decisions: no grpc, no redis. Everything here tests without sockets."""
