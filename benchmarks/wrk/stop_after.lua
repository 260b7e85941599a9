-- wrk script: each thread stops after N responses (N = first script argument, after `--`)
-- and prints a line `WRK_THREAD_STOPPED` on stdout; at the end the same JSON summary as
-- report.lua. A fixed-count run:
--   wrk -t1 -c32 -d600s -s $PWD/benchmarks/wrk/stop_after.lua http://127.0.0.1:8080/ -- 100000
-- wrk's main thread still sleeps for the whole -d (the upper bound on time): whoever runs it
-- sends SIGINT once every thread has said WRK_THREAD_STOPPED, and wrk then reports at once
-- (benchmarks/suite.py does). wrk needs the script's absolute path.
local limit = 0
local seen = 0

function init(args)
  limit = tonumber(args[1] or "0") or 0
end

function response(status, headers, body)
  seen = seen + 1
  if limit > 0 and seen == limit then
    wrk.thread:stop()
    io.write("WRK_THREAD_STOPPED\n")
    io.flush()
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"duration_us":%d,"requests":%d,"bytes":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,"p999_us":%.1f,"max_us":%.1f,"mean_us":%.1f}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
