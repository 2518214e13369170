-- wrk script: POST a realistic ~1 KB OpenAI chat completion with an X-User
-- header, cycling through USERS distinct users so that the limiter works on
-- many buckets (as in production) instead of hammering one.
--
-- The requests are formatted once per thread in init(), so that per-request
-- Lua work is an array lookup: wrk's own cost is the same for both proxy
-- configurations and as small as it can be.

local USERS = 1000

local system = "You are a concise assistant for an engineering team. Answer in plain " ..
  "English, cite the file and line you rely on, and say so when you are unsure. " ..
  "Never invent APIs; prefer the standard library; keep examples short."
local question = "Our Caddy gateway sits in front of several LLM providers. Explain how " ..
  "a GCRA limiter differs from a fixed window counter when a client sends a burst " ..
  "right at the window boundary, and what Retry-After should say in each case. " ..
  "Give a worked example with 60 requests per minute and a burst of 10, then " ..
  "show what happens when three rules (per user, per user and model, per day) " ..
  "apply to the same request and only one of them is out of capacity."

local body = '{"model":"gpt-4o","temperature":0.2,"max_tokens":512,"stream":false,' ..
  '"user":"bench","messages":[' ..
  '{"role":"system","content":"' .. system .. '"},' ..
  '{"role":"user","content":"' .. question .. '"},' ..
  '{"role":"assistant","content":"A GCRA limiter tracks one theoretical arrival time per key."},' ..
  '{"role":"user","content":"Go on, and include the headers a client sees."}]}'

local requests = {}
local counter = 0

function init(args)
  for i = 1, USERS do
    requests[i] = wrk.format("POST", "/v1/chat/completions", {
      ["Content-Type"] = "application/json",
      ["Authorization"] = "Bearer sk-bench-not-a-real-key",
      ["X-User"] = string.format("user-%04d@example.com", i),
    }, body)
  end
  -- Threads start at different users.
  counter = math.random(USERS) - 1
end

function request()
  counter = counter % USERS + 1
  return requests[counter]
end

-- Print the body size once, from the main thread's copy, for the record.
function done(summary, latency, requests_)
  io.write(string.format("body_bytes %d\n", #body))
end
