"""nginx as the reverse-proxy anchor of benchmarks/suite.py: a minimal config, one worker.

`write_config(tmpdir, servers)` writes `nginx.conf` into tmpdir (pid, error log and every temp
path inside it, no access log) with one `server` per (listen port, upstream port) pair, each
proxying to a keep-alive upstream block (keepalive 64, HTTP/1.1, `Connection ""`). `command()`
is the argv that runs it in the foreground: `nginx -c <conf> -p <tmpdir> -e <error log>`.

    python benchmarks/nginx.py LISTEN_PORT UPSTREAM_PORT   # prints the config, for reading
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

CONF = """\
# written by benchmarks/nginx.py for one benchmark run
worker_processes 1;
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
worker_rlimit_nofile 65536;

events {{
    worker_connections 8192;
    multi_accept on;
}}

http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_timeout 75s;
    keepalive_requests 10000000;
    # stream large bodies through memory buffers, never spool them to temp files
    proxy_buffers 16 64k;
    proxy_max_temp_file_size 0;
{blocks}}}
"""

BLOCK = """
    upstream up_{listen} {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{listen} backlog=4096;
        location / {{
            proxy_pass http://up_{listen};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""


def binary() -> str | None:
    """The nginx executable (it lives in /usr/sbin, often not on a user's PATH)."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
         if os.access(p, os.X_OK)), None)


def render(tmp: Path, servers: list[tuple[int, int]]) -> str:
    blocks = "".join(BLOCK.format(listen=listen, upstream=upstream) for listen, upstream in servers)
    return CONF.format(tmp=tmp, blocks=blocks)


def write_config(tmp: Path, servers: list[tuple[int, int]]) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    # nginx's worker may run as an unprivileged user (when started as root): it must be able to
    # traverse the directory holding its temp paths.
    tmp.chmod(0o755)
    conf = tmp / "nginx.conf"
    conf.write_text(render(tmp, servers))
    return conf


def command(nginx: str, tmp: Path, conf: Path) -> list[str]:
    return [nginx, "-c", str(conf), "-p", str(tmp), "-e", str(tmp / "error.log")]


if __name__ == "__main__":
    print(render(Path("/tmp/nginx-bench"), [(int(sys.argv[1]), int(sys.argv[2]))]))
