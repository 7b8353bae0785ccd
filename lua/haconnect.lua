-- haconnect telemetry for HAProxy 2.6+ (loaded with lua-load-per-thread).
-- The upstream identity check is at the end of this file.
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
--   HACONNECT_PROCESS_URL   the sidecar process's own metrics (sidecar, embedded
--                           SPOA), appended before the exporter's; optional
--   HACONNECT_BUCKETS_US    upper bounds of the latency buckets, microseconds, comma-separated
--   HACONNECT_SUM_BITS      how many bits of the latency (us) are counted for _sum
--                           (0 with thread sums)
--   HACONNECT_SUM_TABLE     the thread sums' table ("-": the sum is in the bits)
--   HACONNECT_SUM_CARRY     the thread sums' carry: sum = gpt1 * carry + gpt0
--   HACONNECT_CALLER_TABLES the callers' tables, comma-separated
--   HACONNECT_RATE_BASE     index of the first rate limit refusal counter
--   HACONNECT_RATE_SCOPES   the refusal counters' scope labels, hex, comma-separated ("-": none)
-- Callers' tables (plugin/render/ratelimit.go): key "source|destination",
--   gpc0..gpc4 = answers by status class (1xx..5xx),
--   gpc5.. = answers per latency bucket (not cumulative; the rest is +Inf),
--   then, without thread sums, answers whose latency has bit i set (the
--   sum is rebuilt from them),
--   then from HACONNECT_RATE_BASE requests refused by each rate limit scope.
--   A caller may have entries in several tables (its budget's window
--   changed): they are added up.
-- haconnect_denied: key "source|destination|reason", gpc0 = count.
-- HACONNECT_L7_TABLE (native L7 matching, plugin/render/l7native.go; "-":
--   off): key "source|destination|code", the intention's source and the
--   decision's code: the permission's number times two, plus one for
--   allow; 0 and 1 when no permission matched (the default policy denied,
--   allowed). gpc0 = the requests HAProxy decided so.
-- HACONNECT_SUM_TABLE (thread sums; "-" when the bits above are used): key
--   "thread|bucket|source|destination", gpc0 = answers in the latency
--   bucket (0-based; past the last: +Inf only), the sum of their latencies
--   in microseconds is gpt1 * HACONNECT_SUM_CARRY + gpt0. The caller's own
--   bucket counters are then zero. It is read before the callers' tables:
--   each answer is counted in its status class before its bucket, so the
--   buckets read never exceed the count read after them.

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

-- entries parses `show table` into
-- { {key = ..., gpc = {[0] = n, ...}, gpt = {[0] = n, ...}} }.
local function entries(text)
  local out = {}
  for line in string.gmatch(text or "", "[^\n]+") do
    local key = string.match(line, " key=(%S+)")
    if key then
      local gpc, gpt = {}, {}
      for i, v in string.gmatch(line, " gpc(%d+)=(%d+)") do
        gpc[tonumber(i)] = tonumber(v)
      end
      for i, v in string.gmatch(line, " gpt(%d+)=(%d+)") do
        gpt[tonumber(i)] = tonumber(v)
      end
      out[#out + 1] = { key = key, gpc = gpc, gpt = gpt }
    end
  end
  return out
end

local function split2(key)
  return string.match(key, "^([^|]*)|(.*)$")
end

local function split3(key)
  return string.match(key, "^([^|]*)|([^|]*)|(.*)$")
end

local function unhex(h)
  return (string.gsub(h, "%x%x", function(x) return string.char(tonumber(x, 16)) end))
end

-- label escapes a Prometheus label value.
local function label(v)
  return (string.gsub(v, '[\\"\n]', { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n" }))
end

local function labels(source, destination)
  return string.format('source="%s",destination="%s"', label(source), label(destination))
end

local function seconds(us)
  return string.format("%g", us / 1e6)
end

local CLASSES = 5

local function render()
  local buckets = numbers(env("HACONNECT_BUCKETS_US"))
  local sumBits = tonumber(env("HACONNECT_SUM_BITS"))
  local rateBase = tonumber(env("HACONNECT_RATE_BASE"))
  local scopes = {}
  for h in string.gmatch(env("HACONNECT_RATE_SCOPES"), "[^,]+") do
    if h ~= "-" then
      scopes[#scopes + 1] = unhex(h)
    end
  end
  local b = {}

  -- Thread sums first (see above): each thread's share of a caller's
  -- sum and buckets.
  local fromSums = {} -- "source|destination" -> {sum, buckets[]}
  local sumTable = env("HACONNECT_SUM_TABLE")
  if sumTable ~= "-" then
    local carry = tonumber(env("HACONNECT_SUM_CARRY"))
    local text, err = admin("show table " .. sumTable)
    if not text then
      return nil, "runtime API: " .. tostring(err)
    end
    for _, e in ipairs(entries(text)) do
      local bucket, id = string.match(e.key, "^%d+|(%d+)|(.*)$")
      if id then
        local t = fromSums[id]
        if not t then
          t = { sum = 0, buckets = {} }
          for i = 1, #buckets do t.buckets[i] = 0 end
          fromSums[id] = t
        end
        t.sum = t.sum + (e.gpt[1] or 0) * carry + (e.gpt[0] or 0)
        local i = tonumber(bucket) + 1
        if i <= #buckets then
          t.buckets[i] = t.buckets[i] + (e.gpc[0] or 0)
        end
      end
    end
  end

  -- Every caller's counters, added up over the tables it is in.
  local series = {} -- "source|destination" -> {classes[], count, buckets[], sum, limited[]}
  local order = {}
  for tbl in string.gmatch(env("HACONNECT_CALLER_TABLES"), "[^,]+") do
    local text, err = admin("show table " .. tbl)
    if not text then
      return nil, "runtime API: " .. tostring(err)
    end
    for _, e in ipairs(entries(text)) do
      local source, destination = split2(e.key)
      if source then
        local s = series[e.key]
        if not s then
          s = { source = source, destination = destination, count = 0, sum = 0, classes = {}, buckets = {}, limited = {} }
          for i = 1, CLASSES do s.classes[i] = 0 end
          for i = 1, #buckets do s.buckets[i] = 0 end
          for i = 1, #scopes do s.limited[i] = 0 end
          series[e.key] = s
          order[#order + 1] = e.key
        end
        for i = 1, CLASSES do
          local n = e.gpc[i - 1] or 0
          s.classes[i] = s.classes[i] + n
          s.count = s.count + n
        end
        for i = 1, #buckets do
          s.buckets[i] = s.buckets[i] + (e.gpc[CLASSES + i - 1] or 0)
        end
        for bit = 0, sumBits - 1 do
          s.sum = s.sum + (e.gpc[CLASSES + #buckets + bit] or 0) * (1 << bit)
        end
        for i = 1, #scopes do
          s.limited[i] = s.limited[i] + (e.gpc[rateBase + i - 1] or 0)
        end
      end
    end
  end
  for id, t in pairs(fromSums) do
    local s = series[id]
    if s then
      s.sum = s.sum + t.sum
      for i = 1, #buckets do
        s.buckets[i] = s.buckets[i] + t.buckets[i]
      end
    end
  end
  table.sort(order)

  b[#b + 1] = "# HELP haconnect_requests_total Requests answered through the inbound listener, by caller, destination and status class."
  b[#b + 1] = "# TYPE haconnect_requests_total counter"
  for _, id in ipairs(order) do
    local s = series[id]
    for i = 1, CLASSES do
      if s.classes[i] > 0 then
        b[#b + 1] = string.format('haconnect_requests_total{%s,code_class="%dxx"} %d', labels(s.source, s.destination), i, s.classes[i])
      end
    end
  end

  b[#b + 1] = "# HELP haconnect_request_duration_seconds Time from a request's arrival to its response headers, by caller and destination."
  b[#b + 1] = "# TYPE haconnect_request_duration_seconds histogram"
  for _, id in ipairs(order) do
    local s = series[id]
    if s.count > 0 then
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
  end

  b[#b + 1] = "# HELP haconnect_rate_limited_total Requests (or connections) refused by a rate limit, by caller, destination and scope."
  b[#b + 1] = "# TYPE haconnect_rate_limited_total counter"
  for _, id in ipairs(order) do
    local s = series[id]
    for i, scope in ipairs(scopes) do
      if s.limited[i] > 0 then
        b[#b + 1] = string.format('haconnect_rate_limited_total{%s,scope="%s"} %d', labels(s.source, s.destination), label(scope), s.limited[i])
      end
    end
  end

  local deniedText = admin("show table haconnect_denied") or ""
  b[#b + 1] = "# HELP haconnect_denied_total Requests denied by the authorization check, by caller, destination and reason."
  b[#b + 1] = "# TYPE haconnect_denied_total counter"
  for _, e in ipairs(entries(deniedText)) do
    local source, destination, reason = split3(e.key)
    if source then
      b[#b + 1] = string.format('haconnect_denied_total{%s,reason="%s"} %d', labels(source, destination), label(reason), e.gpc[0] or 0)
    end
  end
  local l7Table = env("HACONNECT_L7_TABLE")
  if l7Table ~= "-" then
    local l7Text = admin("show table " .. l7Table) or ""
    b[#b + 1] = "# HELP haconnect_l7_requests_total HTTP requests decided by an intention's permissions in HAProxy (native matching), by destination, intention source, permission (1-based index, or none: the default policy decided) and result. The SPOA counts the others in haconnect_spoa_l7_requests_total."
    b[#b + 1] = "# TYPE haconnect_l7_requests_total counter"
    for _, e in ipairs(entries(l7Text)) do
      local source, destination, code = string.match(e.key, "^([^|]*)|([^|]*)|(%d+)$")
      code = tonumber(code)
      if code then
        local permission, result = "none", "deny"
        if code >= 2 then
          permission = tostring(code // 2)
        end
        if code % 2 == 1 then
          result = "allow"
        end
        b[#b + 1] = string.format('haconnect_l7_requests_total{%s,permission="%s",result="%s"} %d', labels(source, destination), permission, result, e.gpc[0] or 0)
      end
    end
  end
  return table.concat(b, "\n") .. "\n"
end

-- fetch returns the body of a metrics page, or a comment line naming what
-- did not answer. The timeout keeps a stuck part from holding the scrape.
local function fetch(url, what)
  local hc = core.httpclient()
  local res = hc:get({ url = url, timeout = 2000 })
  if res and res.status == 200 and res.body then
    return res.body
  end
  return "# haconnect: " .. what .. " did not answer\n"
end

core.register_service("haconnect-metrics", "http", function(applet)
  local ok, body, err = pcall(render)
  local status = 200
  if not ok then
    status, body = 500, "haconnect: " .. tostring(body) .. "\n"
  elseif body == nil then
    status, body = 503, "haconnect: " .. tostring(err) .. "\n"
  else
    -- One scrape target for the whole sidecar: HAProxy's counters above,
    -- the process's (sidecar and authorization decisions), then HAProxy's
    -- own exporter. A part that does not answer is named in a comment
    -- line; the rest is still served.
    local process = os.getenv("HACONNECT_PROCESS_URL")
    if process ~= nil and process ~= "" then
      body = body .. fetch(process, "the sidecar process's metrics")
    end
    body = body .. fetch(env("HACONNECT_EXPORTER_URL"), "HAProxy's exporter")
  end
  applet:set_status(status)
  applet:add_header("content-type", "text/plain; version=0.0.4")
  applet:add_header("content-length", string.len(body))
  applet:start_response()
  applet:send(body)
end)

-- ---------------------------------------------------------------------------
-- Upstream identity. Loaded whether or not telemetry is on.
--
-- HAProxy 2.6 verifies an upstream's chain against Consul's CA (ca-file) but
-- has no fetch for a server certificate's URI SAN, and `verifyhost` checks
-- DNS names, which the requester of a Consul leaf chooses. The upstream
-- backends therefore key a map by the peer's certificate, named by its
-- serial number and issuer ("<serial hex>|<issuer DN>": a CA never issues
-- two certificates with one serial, RFC 5280 4.1.2.2), whose value is the
-- certificate's SPIFFE ID, and compare that natively on every response. Only on a miss, i.e. once per
-- distinct certificate, do they call lua.haconnect_peer_uri, which parses
-- the DER, fills the map, and returns the ID.
--
-- haconnect_uri_san(der) is that parse: the single URI SAN of the
-- subjectAltName extension of tbsCertificate, or nil and a reason. It walks
-- the structure from the top with strict DER lengths and refuses anything
-- else: a URI that merely occurs elsewhere in the certificate (the public
-- key, another extension, the subject) is never found.

-- What the map holds for a certificate that names no usable SPIFFE ID. It
-- cannot equal any expected ID (those start with spiffe://).
local PEER_REFUSED = "refused"
-- Map entries one thread may add before it evicts its oldest: the map is
-- shared, so it holds at most this many entries per thread. A sidecar sees
-- a few certificates per upstream instance; an upstream that mints
-- certificates endlessly only makes the parse run again.
local PEER_CACHE_MAX = 1024

-- tlv reads the element at index i of s, which may not run past index
-- limit. It returns the tag and the first and last index of the contents,
-- or nil when the encoding is not DER (indefinite or non-minimal lengths,
-- multi-byte tags, lengths past limit).
local function tlv(s, i, limit)
  if i + 1 > limit then
    return nil
  end
  local tag, len = string.byte(s, i, i + 1)
  if tag & 0x1f == 0x1f then
    return nil
  end
  i = i + 2
  if len >= 0x80 then
    local n = len & 0x7f
    if n < 1 or n > 3 or i + n - 1 > limit or string.byte(s, i) == 0 then
      return nil
    end
    len = 0
    for k = i, i + n - 1 do
      len = len * 256 + string.byte(s, k)
    end
    if len < 0x80 then
      return nil
    end
    i = i + n
  end
  local last = i + len - 1
  if last > limit then
    return nil
  end
  return tag, i, last
end

-- uri_from_names returns the single uniformResourceIdentifier ([6]) of the
-- GeneralNames in s[a..z].
local function uri_from_names(s, a, z)
  local tag, i, last = tlv(s, a, z)
  if tag ~= 0x30 or last ~= z or i > last then
    return nil, "subjectAltName is not a non-empty SEQUENCE"
  end
  local uri
  while i <= last do
    local t, ca, cz = tlv(s, i, last)
    if not t or t & 0xc0 ~= 0x80 then
      return nil, "malformed GeneralName"
    end
    if t & 0x1f == 6 then
      if t ~= 0x86 then
        return nil, "constructed URI name"
      end
      if uri then
        return nil, "more than one URI SAN"
      end
      uri = string.sub(s, ca, cz)
      -- A URI is printable ASCII without spaces. Anything else (a NUL
      -- above all, which would cut the map value short) is refused.
      if uri == "" or string.find(uri, "[^\x21-\x7e]") then
        return nil, "URI SAN with bytes outside printable ASCII"
      end
    end
    i = cz + 1
  end
  if not uri then
    return nil, "no URI SAN"
  end
  return uri
end

local SAN_OID = "\x55\x1d\x11" -- 2.5.29.17

function haconnect_uri_san(der)
  if type(der) ~= "string" or der == "" then
    return nil, "no certificate"
  end
  local n = #der
  -- Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
  local tag, a, z = tlv(der, 1, n)
  if tag ~= 0x30 or z ~= n then
    return nil, "not one DER SEQUENCE"
  end
  local tt, ta, tz = tlv(der, a, z)
  if tt ~= 0x30 then
    return nil, "malformed tbsCertificate"
  end
  local st, _, sz = tlv(der, tz + 1, z)
  if st ~= 0x30 then
    return nil, "malformed signatureAlgorithm"
  end
  local bt, _, bz = tlv(der, sz + 1, z)
  if bt ~= 0x03 or bz ~= z then
    return nil, "malformed signature"
  end
  -- tbsCertificate ::= SEQUENCE { [0] version (v3, for extensions),
  -- serialNumber, signature, issuer, validity, subject,
  -- subjectPublicKeyInfo, [1] issuerUniqueID OPTIONAL,
  -- [2] subjectUniqueID OPTIONAL, [3] extensions }
  local i = ta
  local t, va, vz = tlv(der, i, tz)
  if t ~= 0xa0 or string.sub(der, va, vz) ~= "\x02\x01\x02" then
    return nil, "not an X.509 v3 certificate"
  end
  i = vz + 1
  for _, want in ipairs({ 0x02, 0x30, 0x30, 0x30, 0x30, 0x30 }) do
    local ft, _, fz = tlv(der, i, tz)
    if ft ~= want then
      return nil, "malformed tbsCertificate field"
    end
    i = fz + 1
  end
  for _, optional in ipairs({ 0x81, 0x82 }) do
    local ft, _, fz = tlv(der, i, tz)
    if ft == optional then
      i = fz + 1
    end
  end
  local et, ea, ez = tlv(der, i, tz)
  if et ~= 0xa3 or ez ~= tz then
    return nil, "no extensions"
  end
  local lt, la, lz = tlv(der, ea, ez)
  if lt ~= 0x30 or lz ~= ez then
    return nil, "malformed extensions"
  end
  -- Extension ::= SEQUENCE { extnID, critical BOOLEAN DEFAULT FALSE, extnValue OCTET STRING }
  local uri, why
  local seen = false
  i = la
  while i <= lz do
    local xt, xa, xz = tlv(der, i, lz)
    if xt ~= 0x30 then
      return nil, "malformed extension"
    end
    local ot, oa, oz = tlv(der, xa, xz)
    if ot ~= 0x06 then
      return nil, "malformed extension id"
    end
    local j = oz + 1
    local ct, _, cz = tlv(der, j, xz)
    if ct == 0x01 then
      j = cz + 1
    end
    local vt, vva, vvz = tlv(der, j, xz)
    if vt ~= 0x04 or vvz ~= xz then
      return nil, "malformed extension value"
    end
    if string.sub(der, oa, oz) == SAN_OID then
      if seen then
        return nil, "two subjectAltName extensions"
      end
      seen = true
      uri, why = uri_from_names(der, vva, vvz)
      if not uri then
        return nil, why
      end
    end
    i = xz + 1
  end
  if not seen then
    return nil, "no subjectAltName extension"
  end
  return uri
end

-- The keys this thread put in the map, oldest first, each once (see
-- PEER_CACHE_MAX). Every entry of the map is in the list of the thread
-- that set it last, until that thread deletes it: the map never holds more
-- than the lists. Another thread deleting a key this one still lists only
-- costs a parse when the certificate comes back.
local peer_added = { first = 1, last = 0 }
local peer_listed = {}

local function remember_peer(map, key, value)
  core.set_map(map, key, value)
  local id = map .. " " .. key
  if peer_listed[id] then
    return
  end
  peer_listed[id] = true
  peer_added.last = peer_added.last + 1
  peer_added[peer_added.last] = { map, key, id }
  if peer_added.last - peer_added.first >= PEER_CACHE_MAX then
    local old = peer_added[peer_added.first]
    peer_added[peer_added.first] = nil
    peer_added.first = peer_added.first + 1
    peer_listed[old[3]] = nil
    core.del_map(old[1], old[2])
  end
end

-- lua.haconnect_peer_uri(<map file>,<expected SPIFFE ID>): the SPIFFE ID of
-- the upstream's certificate, or nothing (the caller then refuses). The
-- result is put in the map under the certificate's serial and issuer, a refusal
-- included, so each certificate is parsed and logged once.
core.register_fetches("haconnect_peer_uri", function(txn, map, want)
  local der = txn.f:ssl_s_der()
  if type(der) ~= "string" or der == "" then
    core.Warning("haconnect: upstream refused: no peer certificate (want " .. tostring(want) .. ")")
    return nil
  end
  -- The key the configuration looks up (ssl_s_serial,hex,concat(|,<issuer>)).
  local key = txn.c:hex(txn.f:ssl_s_serial() or "") .. "|" .. (txn.f:ssl_s_i_dn() or "")
  local ok, uri, why = pcall(haconnect_uri_san, der)
  if not ok then
    uri, why = nil, "parse error: " .. tostring(uri)
  end
  remember_peer(map, key, uri or PEER_REFUSED)
  if not uri then
    core.Warning("haconnect: upstream certificate " .. key .. " refused: " .. why .. " (want " .. tostring(want) .. ")")
  elseif uri ~= want then
    core.Warning("haconnect: upstream certificate " .. key .. " refused: it names " .. uri .. ", not " .. tostring(want))
  end
  return uri
end)
