-- wrk script: 256 different GET /v1/decide requests in turn, built once, so every request
-- id draws its own lottery and the requests spread over placements, countries, devices,
-- segments and keywords. All at one time inside the synthetic flights, as live traffic is.
-- nginx gets the same requests (and answers each with its fixed 200).
local requests = {}

function init(args)
  local countries = {"US", "GB", "DE", "FR", "JP", "CA", "BR", "IN"}
  local devices = {"desktop", "mobile", "tablet", "ctv"}
  local oses = {"android", "ios", "windows", "macos"}
  local placements = {"home-top", "home-side", "article-inline", "mobile-banner"}
  for i = 1, 256 do
    requests[i] = wrk.format(nil, string.format(
      "/v1/decide?id=bench-%d&placement=%s&country=%s&device=%s&os=%s"
        .. "&segments=seg-%d,seg-%d,seg-%d&keywords=kw%d&time=1770000000",
      i, placements[i % 4 + 1], countries[(i * 3) % 8 + 1], devices[(i * 7) % 4 + 1],
      oses[(i * 5) % 4 + 1], (i * 13) % 500, (i * 31) % 500, (i * 71) % 500, (i * 17) % 3000))
  end
end

local next_request = 0

function request()
  next_request = next_request % #requests + 1
  return requests[next_request]
end
