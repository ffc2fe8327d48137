-- wrk script: the GET /v1/decide requests in the file given after `--` (one path per line,
-- written by bench_engine.py), sent in turn. The same file drives adpop-loadgen's latency
-- run, so both measure the same request mix. nginx gets the same requests (and answers each
-- with its fixed 200).
local requests = {}

function init(args)
  for path in io.lines(args[1]) do
    if path ~= "" then
      requests[#requests + 1] = wrk.format(nil, path)
    end
  end
  assert(#requests > 0, "decide_requests.lua: no request paths in " .. tostring(args[1]))
end

local next_request = 0

function request()
  next_request = next_request % #requests + 1
  return requests[next_request]
end
