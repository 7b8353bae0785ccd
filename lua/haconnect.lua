-- haconnect telemetry for HAProxy 2.6+ (loaded with lua-load-per-thread).
--
-- Requests are counted natively by the rendered configuration, in stick
-- tables that every thread shares, so the counts are exact whatever the
-- thread count; Lua is only on the scrape path, never per request. This
-- service reads those tables through the runtime API and prints them as
-- Prometheus text, followed by HAProxy's own prometheus-exporter output.
--
-- The configuration passes its layout through the environment (setenv):
--   HACONNECT_ADMIN_SOCKET  runtime API socket
--   HACONNECT_EXPORTER_URL  HAProxy's prometheus-exporter, appended to the output
--   HACONNECT_BUCKETS_US    upper bounds of the latency buckets, microseconds, comma-separated
--   HACONNECT_SUM_BITS      how many bits of the latency (us) are counted for _sum
-- haconnect_requests: key "source|destination|class", gpc0 = count,
--   gpc1..gpcN = requests per latency bucket (not cumulative; the rest is +Inf),
--   gpcN+1.. = requests whose latency has bit i set (the sum is rebuilt from them).
-- haconnect_denied: key "source|destination|reason", gpc0 = count.

local function env(name)
  local v = os.getenv(name)
  if v == nil or v == "" then
    error("haconnect: " .. name .. " is not set")
  end
  return v
end

local function numbers(csv)
  local out = {}
  for n in string.gmatch(csv, "[^,]+") do
    out[#out + 1] = tonumber(n)
  end
  return out
end

local function admin(cmd)
  local s = core.tcp()
  s:settimeout(5)
  local ok, err = s:connect("unix@" .. env("HACONNECT_ADMIN_SOCKET"))
  if not ok then
    return nil, err
  end
  s:send(cmd .. "\n")
  local out = s:receive("*a")
  s:close()
  return out
end

-- entries parses `show table` into { {key = ..., gpc = {[0] = n, ...}} }.
local function entries(text)
  local out = {}
  for line in string.gmatch(text or "", "[^\n]+") do
    local key = string.match(line, " key=(%S+)")
    if key then
      local gpc = {}
      for i, v in string.gmatch(line, "gpc(%d+)=(%d+)") do
        gpc[tonumber(i)] = tonumber(v)
      end
      out[#out + 1] = { key = key, gpc = gpc }
    end
  end
  return out
end

local function split3(key)
  return string.match(key, "^([^|]*)|([^|]*)|(.*)$")
end

local function labels(source, destination)
  return string.format('source="%s",destination="%s"', source, destination)
end

local function seconds(us)
  return string.format("%g", us / 1e6)
end

local function render()
  local buckets = numbers(env("HACONNECT_BUCKETS_US"))
  local sumBits = tonumber(env("HACONNECT_SUM_BITS"))
  local b = {}

  local reqText, err = admin("show table haconnect_requests")
  if not reqText then
    return nil, "runtime API: " .. tostring(err)
  end
  local series = {} -- "source|destination" -> {count, buckets[], sum}
  local order = {}
  b[#b + 1] = "# HELP haconnect_requests_total Requests answered through the inbound listener, by caller, destination and status class."
  b[#b + 1] = "# TYPE haconnect_requests_total counter"
  for _, e in ipairs(entries(reqText)) do
    local source, destination, class = split3(e.key)
    if source then
      local count = e.gpc[0] or 0
      b[#b + 1] = string.format('haconnect_requests_total{%s,code_class="%sxx"} %d', labels(source, destination), class, count)
      local id = source .. "|" .. destination
      local s = series[id]
      if not s then
        s = { source = source, destination = destination, count = 0, sum = 0, buckets = {} }
        for i = 1, #buckets do s.buckets[i] = 0 end
        series[id] = s
        order[#order + 1] = id
      end
      s.count = s.count + count
      for i = 1, #buckets do
        s.buckets[i] = s.buckets[i] + (e.gpc[i] or 0)
      end
      for bit = 0, sumBits - 1 do
        s.sum = s.sum + (e.gpc[#buckets + 1 + bit] or 0) * (1 << bit)
      end
    end
  end
  table.sort(order)

  b[#b + 1] = "# HELP haconnect_request_duration_seconds Time from a request's arrival to its response headers, by caller and destination."
  b[#b + 1] = "# TYPE haconnect_request_duration_seconds histogram"
  for _, id in ipairs(order) do
    local s = series[id]
    local l = labels(s.source, s.destination)
    local cumulative = 0
    for i, bound in ipairs(buckets) do
      cumulative = cumulative + s.buckets[i]
      b[#b + 1] = string.format('haconnect_request_duration_seconds_bucket{%s,le="%s"} %d', l, seconds(bound), cumulative)
    end
    b[#b + 1] = string.format('haconnect_request_duration_seconds_bucket{%s,le="+Inf"} %d', l, s.count)
    b[#b + 1] = string.format("haconnect_request_duration_seconds_sum{%s} %.6f", l, s.sum / 1e6)
    b[#b + 1] = string.format("haconnect_request_duration_seconds_count{%s} %d", l, s.count)
  end

  local deniedText = admin("show table haconnect_denied") or ""
  b[#b + 1] = "# HELP haconnect_denied_total Requests denied by the authorization check, by caller, destination and reason."
  b[#b + 1] = "# TYPE haconnect_denied_total counter"
  for _, e in ipairs(entries(deniedText)) do
    local source, destination, reason = split3(e.key)
    if source then
      b[#b + 1] = string.format('haconnect_denied_total{%s,reason="%s"} %d', labels(source, destination), reason, e.gpc[0] or 0)
    end
  end
  return table.concat(b, "\n") .. "\n"
end

core.register_service("haconnect-metrics", "http", function(applet)
  local ok, body, err = pcall(render)
  local status = 200
  if not ok then
    status, body = 500, "haconnect: " .. tostring(body) .. "\n"
  elseif body == nil then
    status, body = 503, "haconnect: " .. tostring(err) .. "\n"
  else
    local hc = core.httpclient()
    local res = hc:get({ url = env("HACONNECT_EXPORTER_URL") })
    if res and res.status == 200 and res.body then
      body = body .. res.body
    else
      body = body .. "# haconnect: HAProxy's exporter did not answer\n"
    end
  end
  applet:set_status(status)
  applet:add_header("content-type", "text/plain; version=0.0.4")
  applet:add_header("content-length", string.len(body))
  applet:start_response()
  applet:send(body)
end)
