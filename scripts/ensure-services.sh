#!/usr/bin/env bash
# Makes sure PostgreSQL and RabbitMQ answer on 127.0.0.1; starts them when installed but stopped.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # name port seconds
  for _ in $(seq 1 "$3"); do port_open "$2" && return 0; sleep 1; done
  echo "error: $1 is not listening on 127.0.0.1:$2 after $3 s" >&2
  return 1
}

if ! port_open 5432; then
  echo "starting PostgreSQL"
  if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
  else
    echo "error: PostgreSQL is not running and not installed (apt-get install postgresql)" >&2
    exit 1
  fi
  wait_port PostgreSQL 5432 30
fi

if ! port_open 5672; then
  echo "starting RabbitMQ"
  if command -v rabbitmq-server >/dev/null; then
    rabbitmq-server -detached
  else
    echo "error: RabbitMQ is not running and not installed (apt-get install rabbitmq-server)" >&2
    exit 1
  fi
  wait_port RabbitMQ 5672 90
fi
echo "services: PostgreSQL 127.0.0.1:5432, RabbitMQ 127.0.0.1:5672"
