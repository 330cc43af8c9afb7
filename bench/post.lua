-- wrk script: a small non-streamed chat completion (POST with a JSON body).
-- The model id comes from $BENCH_MODEL (default "m"); fake-llm ignores it, llmvisor routes by it.
local model = os.getenv("BENCH_MODEL") or "m"
local max_tokens = os.getenv("BENCH_MAX_TOKENS") or "1"
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"' .. model .. '","messages":[{"role":"user","content":"Say hi"}],'
    .. '"max_tokens":' .. max_tokens .. ',"stream":false}'
