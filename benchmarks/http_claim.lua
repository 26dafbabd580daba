-- wrk script for the http side of benchmarks.load: one claim per request
-- (POST /api/v1/code/redeem, the original's body), a fresh customer each, over
-- keep-alive connections. Parameters come from the environment:
--   ANGO_BATCH, ANGO_CLIENT, ANGO_TOKEN   the batch, its client, the server's token
--   ANGO_PREFIX                            customer prefix, unique per wrk run
--   ANGO_CODES                             if set, each thread writes the codes it
--                                          receives (or "!<status>") to ANGO_CODES.<n>
local batch = os.getenv("ANGO_BATCH")
local client = os.getenv("ANGO_CLIENT")
local prefix = os.getenv("ANGO_PREFIX") or "h"
local codes_path = os.getenv("ANGO_CODES")
local headers = {
  ["Content-Type"] = "application/json",
  ["Authorization"] = "Bearer " .. os.getenv("ANGO_TOKEN"),
}
local threads = 0
local n = 0
local codes = nil

function setup(thread)
  thread:set("id", threads)
  threads = threads + 1
end

function init(args)
  if codes_path then
    codes = io.open(codes_path .. "." .. id, "w")
    codes:setvbuf("line")  -- worker threads have no exit hook: never leave a tail unwritten
  end
end

function request()
  n = n + 1
  local body = string.format('{"batchid":"%s","clientid":"%s","customerid":"%s%d-%d"}',
                             batch, client, prefix, id, n)
  return wrk.format("POST", "/api/v1/code/redeem", headers, body)
end

function response(status, hdrs, body)
  if codes then
    if status == 200 then
      codes:write(string.sub(body, 10, -3), "\n")  -- {"code":"<code>"}
    else
      codes:write("!", status, "\n")
    end
  end
end
