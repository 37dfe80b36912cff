"""The gRPC service kit both servers use: one way to map errors to status codes and log a
call (`calls`), to build TLS credentials (`tls`), to run a server with health, reflection
and a graceful stop (`server`), and to take flag defaults from the environment (`flags`)."""
