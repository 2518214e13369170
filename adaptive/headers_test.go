package adaptive

import (
	"net/http"
	"strings"
	"testing"
	"time"
)

// parseNow is the arrival time used throughout, so that timestamps in the
// fixtures have fixed meanings.
var parseNow = time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)

// noQuota is a Quota with nothing reported.
var noQuota = Quota{Limit: -1, Remaining: -1, Reset: -1}

// respHeader builds a response header the way net/http does: keys canonicalized
// (the fixtures use the lowercase names HTTP/2 and provider docs show),
// values in order.
func respHeader(kv ...string) http.Header {
	h := http.Header{}
	for i := 0; i+1 < len(kv); i += 2 {
		h.Add(kv[i], kv[i+1])
	}
	return h
}

// absentObs is an Observation with status and nothing else reported.
func absentObs(status int) Observation {
	return Observation{Status: status, Requests: noQuota, Tokens: noQuota, InputTokens: noQuota, OutputTokens: noQuota, RetryAfter: -1}
}

// withObs returns o changed by f, to state expectations as differences from
// absentObs.
func withObs(o Observation, f func(*Observation)) Observation { f(&o); return o }

type parseCase struct {
	name   string
	status int
	h      http.Header
	body   string
	want   Observation
}

func runParseCases(t *testing.T, cases []parseCase) {
	t.Helper()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var body []byte
			if c.body != "" {
				body = []byte(c.body)
			}
			checkCollectors(t, c.h)
			got := Parse(c.status, c.h, body, parseNow)
			if got != c.want {
				t.Errorf("Parse =\n %+v\nwant\n %+v", got, c.want)
			}
		})
	}
}

// checkCollectors checks that both ways of collecting header values find
// the same ones, since which one runs depends on the header count.
func checkCollectors(t testing.TB, h http.Header) {
	t.Helper()
	var walked, looked [numSlots]string
	fw, fl := collectWalk(h, &walked), collectLookup(h, &looked)
	if walked != looked || fw != fl {
		t.Errorf("collectWalk found %q (%v),\ncollectLookup %q (%v)", walked, fw, looked, fl)
	}
	if fw != (walked != [numSlots]string{}) && !hasEmptyValue(h) {
		t.Errorf("collectWalk reported found=%v for %q", fw, walked)
	}
}

// hasEmptyValue reports whether some header's first value is "", which
// collect reports as found although raw does not show it.
func hasEmptyValue(h http.Header) bool {
	for _, v := range h {
		if len(v) > 0 && v[0] == "" {
			return true
		}
	}
	return false
}

// openAIHeaders is a real chat completions response's header set (ids
// changed): the rate-limit fields sit among a dozen others.
func openAIHeaders() http.Header {
	return respHeader(
		"date", "Sun, 01 Jun 2025 12:00:00 GMT",
		"content-type", "application/json",
		"transfer-encoding", "chunked",
		"connection", "keep-alive",
		"access-control-expose-headers", "X-Request-ID",
		"openai-organization", "user-abc123",
		"openai-processing-ms", "412",
		"openai-project", "proj_abc123",
		"openai-version", "2020-10-01",
		"x-envoy-upstream-service-time", "418",
		"x-ratelimit-limit-requests", "10000",
		"x-ratelimit-limit-tokens", "30000000",
		"x-ratelimit-remaining-requests", "9999",
		"x-ratelimit-remaining-tokens", "29999987",
		"x-ratelimit-reset-requests", "6ms",
		"x-ratelimit-reset-tokens", "0s",
		"x-request-id", "req_0123456789abcdef0123456789abcdef",
		"strict-transport-security", "max-age=31536000; includeSubDomains; preload",
		"cf-cache-status", "DYNAMIC",
		"set-cookie", "__cf_bm=abc; path=/; expires=Sun, 01-Jun-25 12:30:00 GMT; domain=.api.openai.com; HttpOnly; Secure; SameSite=None",
		"x-content-type-options", "nosniff",
		"server", "cloudflare",
		"cf-ray", "94a1b2c3d4e5f607-AMS",
		"content-encoding", "br",
		"alt-svc", `h3=":443"; ma=86400`,
	)
}

func TestParseOpenAI(t *testing.T) {
	exhausted := openAIHeaders()
	exhausted.Set("x-ratelimit-remaining-requests", "0")
	exhausted.Set("x-ratelimit-reset-requests", "1m30.5s")
	exhausted.Set("x-ratelimit-remaining-tokens", "0")
	exhausted.Set("x-ratelimit-reset-tokens", "6m0s")

	runParseCases(t, []parseCase{
		{"200", 200, openAIHeaders(), "", withObs(absentObs(200), func(o *Observation) {
			o.Requests = Quota{Limit: 10000, Remaining: 9999, Reset: 6 * time.Millisecond}
			o.Tokens = Quota{Limit: 30000000, Remaining: 29999987, Reset: 0}
		})},
		{"429 exhausted", 429, exhausted, `{"error":{"message":"Rate limit reached for requests","type":"requests","param":null,"code":"rate_limit_exceeded"}}`,
			withObs(absentObs(429), func(o *Observation) {
				o.Requests = Quota{Limit: 10000, Remaining: 0, Reset: 90*time.Second + 500*time.Millisecond}
				o.Tokens = Quota{Limit: 30000000, Remaining: 0, Reset: 6 * time.Minute}
			})},
		{"plain seconds resets", 200, respHeader(
			"x-ratelimit-reset-requests", "12",
			"x-ratelimit-reset-tokens", "0.25",
		), "", withObs(absentObs(200), func(o *Observation) {
			o.Requests = Quota{Limit: -1, Remaining: -1, Reset: 12 * time.Second}
			o.Tokens = Quota{Limit: -1, Remaining: -1, Reset: 250 * time.Millisecond}
		})},
		{"partial", 200, respHeader("x-ratelimit-limit-tokens", "5000"), "", withObs(absentObs(200), func(o *Observation) {
			o.Tokens = Quota{Limit: 5000, Remaining: -1, Reset: -1}
		})},
		{"junk everywhere", 200, respHeader(
			"x-ratelimit-limit-requests", "abc",
			"x-ratelimit-remaining-requests", "-1",
			"x-ratelimit-reset-requests", "-5s",
			"x-ratelimit-limit-tokens", "1e3",
			"x-ratelimit-remaining-tokens", "NaN",
			"x-ratelimit-reset-tokens", "soon",
		), "", absentObs(200)},
		// Names OpenAI sends that this package does not read must not be
		// mistaken for the ones it does.
		{"lookalike names", 200, respHeader(
			"x-ratelimit-limit-tokens_usage_based", "160000",
			"x-ratelimit-remaining-tokens_usage_based", "159976",
			"x-ratelimit-reset-tokens_usage_based", "9ms",
			"x-ratelimit-limit", "100",
			"x-ratelimit-reset", "1718000000",
		), "", absentObs(200)},
	})
}

func TestParseAzure(t *testing.T) {
	runParseCases(t, []parseCase{
		// Azure OpenAI's 429: remaining without limit, and both retry
		// headers, the ms one finer.
		{"429 retry-after-ms", 429, respHeader(
			"content-length", "343",
			"content-type", "application/json",
			"retry-after", "10",
			"retry-after-ms", "9240",
			"x-ratelimit-remaining-requests", "0",
			"x-ratelimit-remaining-tokens", "0",
			"x-ms-region", "Sweden Central",
			"apim-request-id", "2b7e0d3c-9f1e-4d52-8a3b-6c5d4e3f2a1b",
			"x-ms-client-request-id", "Not-Set",
			"x-content-type-options", "nosniff",
			"strict-transport-security", "max-age=31536000; includeSubDomains; preload",
			"date", "Sun, 01 Jun 2025 12:00:00 GMT",
		), `{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 10 seconds."}}`,
			withObs(absentObs(429), func(o *Observation) {
				o.Requests = Quota{Limit: -1, Remaining: 0, Reset: -1}
				o.Tokens = Quota{Limit: -1, Remaining: 0, Reset: -1}
				o.RetryAfter = 9240 * time.Millisecond
			})},
		{"200 remaining only", 200, respHeader(
			"x-ratelimit-remaining-requests", "249",
			"x-ratelimit-remaining-tokens", "249000",
			"x-ratelimit-limit-requests", "250",
			"x-ratelimit-limit-tokens", "250000",
		), "", withObs(absentObs(200), func(o *Observation) {
			o.Requests = Quota{Limit: 250, Remaining: 249, Reset: -1}
			o.Tokens = Quota{Limit: 250000, Remaining: 249000, Reset: -1}
		})},
		// Some Azure deployments (the Responses API) report -1 for
		// "unknown"; that must not read as a limit.
		{"-1 unknown", 200, respHeader(
			"x-ratelimit-limit-tokens", "-1",
			"x-ratelimit-remaining-tokens", "-1",
			"x-ratelimit-reset-tokens", "0",
		), "", withObs(absentObs(200), func(o *Observation) {
			o.Tokens = Quota{Limit: -1, Remaining: -1, Reset: 0}
		})},
		{"fractional retry-after-ms", 429, respHeader("retry-after-ms", "1500.5", "retry-after", "2"), "",
			withObs(absentObs(429), func(o *Observation) { o.RetryAfter = 1500*time.Millisecond + 500*time.Microsecond })},
		{"invalid retry-after-ms falls back", 429, respHeader("retry-after-ms", "soon", "retry-after", "2"), "",
			withObs(absentObs(429), func(o *Observation) { o.RetryAfter = 2 * time.Second })},
	})
}

func TestParseAnthropic(t *testing.T) {
	anthropic := respHeader(
		"date", "Sun, 01 Jun 2025 12:00:00 GMT",
		"content-type", "application/json",
		"transfer-encoding", "chunked",
		"connection", "keep-alive",
		"anthropic-ratelimit-input-tokens-limit", "400000",
		"anthropic-ratelimit-input-tokens-remaining", "399000",
		"anthropic-ratelimit-input-tokens-reset", "2025-06-01T12:00:01Z",
		"anthropic-ratelimit-output-tokens-limit", "80000",
		"anthropic-ratelimit-output-tokens-remaining", "79000",
		"anthropic-ratelimit-output-tokens-reset", "2025-06-01T12:00:00.750Z",
		"anthropic-ratelimit-requests-limit", "4000",
		"anthropic-ratelimit-requests-remaining", "3999",
		"anthropic-ratelimit-requests-reset", "2025-06-01T12:00:00.015Z",
		"anthropic-ratelimit-tokens-limit", "480000",
		"anthropic-ratelimit-tokens-remaining", "478000",
		"anthropic-ratelimit-tokens-reset", "2025-06-01T12:00:01Z",
		"request-id", "req_011CPk1abcdefghijklmnopq",
		"strict-transport-security", "max-age=31536000; includeSubDomains; preload",
		"anthropic-organization-id", "8f3c2a1b-0000-4000-8000-000000000000",
		"via", "1.1 google",
		"cf-cache-status", "DYNAMIC",
		"x-robots-tag", "none",
		"server", "cloudflare",
		"cf-ray", "94a1b2c3d4e5f607-AMS",
		"content-encoding", "gzip",
	)
	full := withObs(absentObs(200), func(o *Observation) {
		o.Requests = Quota{Limit: 4000, Remaining: 3999, Reset: 15 * time.Millisecond}
		o.Tokens = Quota{Limit: 480000, Remaining: 478000, Reset: time.Second}
		o.InputTokens = Quota{Limit: 400000, Remaining: 399000, Reset: time.Second}
		o.OutputTokens = Quota{Limit: 80000, Remaining: 79000, Reset: 750 * time.Millisecond}
	})

	limited := anthropic.Clone()
	limited.Set("anthropic-ratelimit-requests-remaining", "0")
	limited.Set("anthropic-ratelimit-requests-reset", "2025-06-01T12:00:23Z")
	limited.Set("retry-after", "23")

	runParseCases(t, []parseCase{
		{"200", 200, anthropic, "", full},
		{"429", 429, limited, `{"type":"error","error":{"type":"rate_limit_error","message":"Number of requests has exceeded your rate limit."}}`,
			withObs(full, func(o *Observation) {
				o.Status = 429
				o.Requests = Quota{Limit: 4000, Remaining: 0, Reset: 23 * time.Second}
				o.RetryAfter = 23 * time.Second
			})},
		{"529 overloaded", 529, respHeader("retry-after", "5", "x-should-retry", "true"),
			`{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}`,
			withObs(absentObs(529), func(o *Observation) { o.RetryAfter = 5 * time.Second })},
		{"reset in the past", 200, respHeader("anthropic-ratelimit-tokens-reset", "2025-06-01T11:59:00Z"), "",
			withObs(absentObs(200), func(o *Observation) { o.Tokens = Quota{Limit: -1, Remaining: -1, Reset: 0} })},
		{"reset with offset", 200, respHeader("anthropic-ratelimit-tokens-reset", "2025-06-01T14:00:30+02:00"), "",
			withObs(absentObs(200), func(o *Observation) { o.Tokens = Quota{Limit: -1, Remaining: -1, Reset: 30 * time.Second} })},
		{"reset far away", 200, respHeader("anthropic-ratelimit-tokens-reset", "2999-01-01T00:00:00Z"), "",
			withObs(absentObs(200), func(o *Observation) { o.Tokens = Quota{Limit: -1, Remaining: -1, Reset: MaxWait} })},
		{"reset junk", 200, respHeader(
			"anthropic-ratelimit-tokens-reset", "in 5 seconds",
			"anthropic-ratelimit-requests-reset", "1s", // an OpenAI form is not a timestamp
			"anthropic-ratelimit-input-tokens-reset", "2025-06-01 12:00:01",
			"anthropic-ratelimit-output-tokens-reset", "",
		), "", absentObs(200)},
	})
}

func TestParseGemini(t *testing.T) {
	const errObj = `{
  "error": {
    "code": 429,
    "message": "You exceeded your current quota, please check your plan and billing details.",
    "status": "RESOURCE_EXHAUSTED",
    "details": [
      {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [
          {
            "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
            "quotaDimensions": {"location": "global", "model": "gemini-2.0-flash"},
            "quotaValue": "15"
          }
        ]
      },
      {
        "@type": "type.googleapis.com/google.rpc.Help",
        "links": [{"description": "Learn more about Gemini API quotas", "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]
      },
      {
        "@type": "type.googleapis.com/google.rpc.RetryInfo",
        "retryDelay": "34s"
      }
    ]
  }
}
`
	geminiHeaders := func() http.Header {
		return respHeader(
			"content-type", "application/json; charset=UTF-8",
			"vary", "Origin",
			"vary", "X-Origin",
			"vary", "Referer",
			"date", "Sun, 01 Jun 2025 12:00:00 GMT",
			"server", "scaffolding on HTTPServer2",
			"x-xss-protection", "0",
			"x-frame-options", "SAMEORIGIN",
			"x-content-type-options", "nosniff",
			"server-timing", "gfet4t7; dur=52",
			"alt-svc", `h3=":443"; ma=2592000,h3-29=":443"; ma=2592000`,
		)
	}
	retry := func(d time.Duration) Observation {
		return withObs(absentObs(429), func(o *Observation) { o.RetryAfter = d })
	}
	delay := func(s string) string {
		return strings.Replace(errObj, `"34s"`, s, 1)
	}
	// padDelay returns errObj grown by n bytes after the retryDelay.
	padDelay := func(n int) string {
		const field = `, "p": ""`
		return delay(`"34s"` + field[:len(field)-1] + strings.Repeat("x", n-len(field)) + `"`)
	}
	if n := len(padDelay(100)); n != len(errObj)+100 {
		t.Fatalf("padDelay(100) grew errObj by %d", n-len(errObj))
	}
	runParseCases(t, []parseCase{
		{"object", 429, geminiHeaders(), errObj, retry(34 * time.Second)},
		{"array wrapper", 429, geminiHeaders(), "[" + errObj + "]", retry(34 * time.Second)},
		{"array, second element", 429, geminiHeaders(), `[{"error":{"code":429}},` + errObj + "]", retry(34 * time.Second)},
		{"fraction", 429, nil, delay(`"0.5s"`), retry(500 * time.Millisecond)},
		{"fraction, trailing zeros", 429, nil, delay(`"1.500s"`), retry(1500 * time.Millisecond)},
		{"nanoseconds", 429, nil, delay(`"1.000000001s"`), retry(time.Second + 1)},
		{"zero", 429, nil, delay(`"0s"`), retry(0)},
		{"huge", 429, nil, delay(`"315576000000s"`), retry(MaxWait)},
		{"negative", 429, nil, delay(`"-1s"`), absentObs(429)},
		{"no unit", 429, nil, delay(`"34"`), absentObs(429)},
		{"other unit", 429, nil, delay(`"34ms"`), absentObs(429)},
		{"number", 429, nil, delay(`34`), absentObs(429)},
		{"object delay", 429, nil, delay(`{"seconds":34}`), absentObs(429)},
		{"wrong type", 429, nil, strings.Replace(errObj, "google.rpc.RetryInfo", "google.rpc.Other", 1), absentObs(429)},
		{"no retry info", 429, nil, `{"error":{"code":429,"message":"Resource exhausted. Please try again later.","status":"RESOURCE_EXHAUSTED"}}`, absentObs(429)},
		{"not json", 429, nil, `<html>"retryDelay": "34s"</html>`, absentObs(429)},
		{"truncated", 429, nil, errObj[:strings.Index(errObj, `"34s"`)+len(`"34s"`)], absentObs(429)},
		{"success body ignored", 200, nil, errObj, absentObs(200)},
		// Beyond MaxBody nothing is looked at: a RetryInfo past it is
		// not seen, and one before it is in a document cut short, which
		// does not parse.
		{"RetryInfo past MaxBody", 429, nil, strings.Replace(errObj, `"message": "`, `"message": "`+strings.Repeat("x", MaxBody), 1), absentObs(429)},
		// +2: cutting only errObj's final newline would leave valid JSON.
		{"document past MaxBody", 429, nil, padDelay(MaxBody - len(errObj) + 2), absentObs(429)},
		{"document at MaxBody", 429, nil, padDelay(MaxBody - len(errObj)), retry(34 * time.Second)},
		{"headers win", 429, respHeader("retry-after", "7"), errObj, retry(7 * time.Second)},
		{"invalid headers fall back to body", 429, respHeader("retry-after", "x"), errObj, retry(34 * time.Second)},
	})
}

func TestParseNoRateLimitHeaders(t *testing.T) {
	runParseCases(t, []parseCase{
		{"vLLM", 200, respHeader(
			"date", "Sun, 01 Jun 2025 12:00:00 GMT",
			"server", "uvicorn",
			"content-length", "612",
			"content-type", "application/json",
		), "", absentObs(200)},
		{"Ollama", 200, respHeader(
			"content-type", "application/json; charset=utf-8",
			"date", "Sun, 01 Jun 2025 12:00:00 GMT",
			"content-length", "381",
		), "", absentObs(200)},
		{"vLLM error", 400, respHeader("content-type", "application/json"),
			`{"object":"error","message":"max_tokens too large","type":"BadRequestError","param":null,"code":400}`, absentObs(400)},
		{"nil header", 502, nil, "bad gateway", absentObs(502)},
		{"empty header", 200, http.Header{}, "", absentObs(200)},
		{"empty value list", 200, http.Header{"X-Ratelimit-Limit-Requests": nil, "Retry-After": {}}, "", absentObs(200)},
	})
	if Parse(200, nil, nil, parseNow).HasQuota() {
		t.Error("HasQuota true without headers")
	}
}

func TestParseRetryAfter(t *testing.T) {
	date := func(t time.Time) string { return t.Format(http.TimeFormat) }
	cases := []struct {
		name   string
		h      http.Header
		want   time.Duration
		status int
	}{
		{"seconds", respHeader("retry-after", "20"), 20 * time.Second, 429},
		{"zero", respHeader("retry-after", "0"), 0, 429},
		{"fraction", respHeader("retry-after", "1.5"), 1500 * time.Millisecond, 429},
		{"OWS", respHeader("retry-after", "  12 "), 12 * time.Second, 429},
		{"HTTP-date", respHeader("retry-after", date(parseNow.Add(90*time.Second))), 90 * time.Second, 503},
		{"HTTP-date past", respHeader("retry-after", date(parseNow.Add(-time.Hour))), 0, 503},
		{"HTTP-date far", respHeader("retry-after", date(parseNow.Add(400*24*time.Hour))), MaxWait, 503},
		{"RFC 850 date", respHeader("retry-after", "Sunday, 01-Jun-25 12:00:10 GMT"), 10 * time.Second, 503},
		{"asctime date", respHeader("retry-after", "Sun Jun  1 12:00:10 2025"), 10 * time.Second, 503},
		{"over a day", respHeader("retry-after", "100000"), MaxWait, 429},
		// RFC 9110 §1.2.2: delta-seconds past what the recipient can
		// represent is the largest it can; here that is MaxWait.
		{"beyond int64", respHeader("retry-after", "99999999999999999999"), MaxWait, 429},
		{"ms preferred", respHeader("retry-after", "1", "retry-after-ms", "250"), 250 * time.Millisecond, 429},
		{"ms alone", respHeader("retry-after-ms", "250"), 250 * time.Millisecond, 429},
		{"ms zero", respHeader("retry-after-ms", "0"), 0, 429},
		{"ms over a day", respHeader("retry-after-ms", "90000000"), MaxWait, 429},
		{"ms negative falls back", respHeader("retry-after-ms", "-5", "retry-after", "3"), 3 * time.Second, 429},
		{"first value", respHeader("retry-after", "4", "retry-after", "9"), 4 * time.Second, 429},
		{"informational on 200", respHeader("retry-after", "4"), 4 * time.Second, 200},
	}
	for _, junk := range []string{"", " ", "abc", "1e3", "NaN", "-1", "+1", "1.", ".5", "1,5", "0x10", "1 2", "Inf", "Sun, 01 Jun 2025", "Sun, 32 Jun 2025 12:00:10 GMT"} {
		cases = append(cases, struct {
			name   string
			h      http.Header
			want   time.Duration
			status int
		}{"junk " + junk, respHeader("retry-after", junk, "retry-after-ms", junk), -1, 429})
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			o := Parse(c.status, c.h, nil, parseNow)
			if o.RetryAfter != c.want {
				t.Errorf("RetryAfter = %v, want %v", o.RetryAfter, c.want)
			}
			if o.HasQuota() {
				t.Error("HasQuota true with only retry headers")
			}
		})
	}
}

func TestParseCount(t *testing.T) {
	for _, c := range []struct {
		in   string
		want int64
	}{
		{"0", 0},
		{"1", 1},
		{"007", 7},
		{"  12 ", 12},
		{"\t12", 12},
		{"1000000000000", MaxCount},
		{"1000000000001", MaxCount},
		{"9223372036854775807", MaxCount},
		{"9223372036854775808", -1},
		{"99999999999999999999", -1},
		{"", -1},
		{"   ", -1},
		{"abc", -1},
		{"1e3", -1},
		{"NaN", -1},
		{"-1", -1},
		{"-0", -1},
		{"+5", -1},
		{"12.0", -1},
		{"1 2", -1},
		{"1,000", -1},
		{"١٢", -1}, // Arabic-Indic digits are not ASCII digits
	} {
		if got := parseCount(c.in); got != c.want {
			t.Errorf("parseCount(%q) = %d, want %d", c.in, got, c.want)
		}
	}
}

func TestParseGoDuration(t *testing.T) {
	for _, c := range []struct {
		in   string
		want time.Duration
	}{
		{"0s", 0},
		{"0", 0},
		{"1s", time.Second},
		{"20ms", 20 * time.Millisecond},
		{"6m0s", 6 * time.Minute},
		{"1m30.5s", 90*time.Second + 500*time.Millisecond},
		{"2m59.56s", 2*time.Minute + 59560*time.Millisecond},
		{"1h2m3s", time.Hour + 2*time.Minute + 3*time.Second},
		{"1.5h", 90 * time.Minute},
		{"500us", 500 * time.Microsecond},
		{"500µs", 500 * time.Microsecond},
		{"500μs", 500 * time.Microsecond},
		{"7ns", 7},
		{"12", 12 * time.Second},
		{"0.25", 250 * time.Millisecond},
		{" 1s ", time.Second},
		{"25h", MaxWait},
		{"1440m1s", MaxWait},
		{"99999999999999999999s", MaxWait},
		{"99999999999999999999", MaxWait},
		{"", -1},
		{"abc", -1},
		{"-1s", -1},
		{"-1", -1},
		{"+1s", -1},
		{"1e3", -1},
		{"NaN", -1},
		{"s", -1},
		{"1", time.Second},
		{"1x", -1},
		{"1s2", -1},
		{".5s", -1},
		{"1.s", -1},
		{"1..5s", -1},
		{"1 s", -1},
		{"1d", -1},
	} {
		if got := parseGoDuration(c.in); got != c.want {
			t.Errorf("parseGoDuration(%q) = %v, want %v", c.in, got, c.want)
		}
	}
}

// TestHeaderNames checks that every name Parse reads is found however the
// upstream spelled it, since net/http canonicalizes them all.
func TestHeaderNames(t *testing.T) {
	type field struct {
		q    func(*Observation) *Quota
		name string
	}
	req := func(o *Observation) *Quota { return &o.Requests }
	tok := func(o *Observation) *Quota { return &o.Tokens }
	in := func(o *Observation) *Quota { return &o.InputTokens }
	out := func(o *Observation) *Quota { return &o.OutputTokens }
	for _, f := range []field{
		{req, "x-ratelimit-%s-requests"},
		{tok, "x-ratelimit-%s-tokens"},
		{req, "anthropic-ratelimit-requests-%s"},
		{tok, "anthropic-ratelimit-tokens-%s"},
		{in, "anthropic-ratelimit-input-tokens-%s"},
		{out, "anthropic-ratelimit-output-tokens-%s"},
	} {
		reset := "5s"
		if strings.HasPrefix(f.name, "anthropic") {
			reset = parseNow.Add(5 * time.Second).Format(time.RFC3339)
		}
		for _, spell := range []func(string) string{strings.ToLower, strings.ToUpper, http.CanonicalHeaderKey} {
			name := func(part string) string { return spell(strings.Replace(f.name, "%s", part, 1)) }
			h := respHeader(name("limit"), "100", name("remaining"), "40", name("reset"), reset)
			o := Parse(200, h, nil, parseNow)
			if got, want := *f.q(&o), (Quota{Limit: 100, Remaining: 40, Reset: 5 * time.Second}); got != want {
				t.Errorf("%s: got %+v, want %+v", name("*"), got, want)
			}
			if !o.HasQuota() {
				t.Errorf("%s: HasQuota false", name("*"))
			}
		}
	}
	if o := Parse(429, respHeader("RETRY-AFTER-MS", "5"), nil, parseNow); o.RetryAfter != 5*time.Millisecond {
		t.Errorf("RETRY-AFTER-MS: RetryAfter = %v", o.RetryAfter)
	}
}

// TestHeaderNameTables checks that headerNames (used to probe large maps)
// and collectWalk's switch (used to walk small ones) agree on every name
// and slot, and that the names are canonical so that map indexing finds
// what http.Header.Get would.
func TestHeaderNameTables(t *testing.T) {
	for i, name := range headerNames {
		if c := http.CanonicalHeaderKey(name); c != name {
			t.Errorf("slot %d: %q is not canonical (%q)", i, name, c)
		}
		var raw [numSlots]string
		collectWalk(http.Header{name: {"v"}}, &raw)
		var want [numSlots]string
		want[i] = "v"
		if raw != want {
			t.Errorf("collectWalk put %q in %q", name, raw)
		}
	}
	// Both strategies run, depending on the map's size.
	small, large := openAIHeaders(), openAIHeaders()
	for k := range small {
		if !strings.HasPrefix(k, hOpenAIPrefix) {
			delete(small, k)
		}
	}
	if len(small) > numSlots || len(large) <= numSlots {
		t.Fatalf("fixtures of %d and %d headers do not exercise both strategies", len(small), len(large))
	}
	if a, b := Parse(200, small, nil, parseNow), Parse(200, large, nil, parseNow); a != b {
		t.Errorf("walk gave %+v, lookup %+v", a, b)
	}
}

func TestParseMultipleValues(t *testing.T) {
	h := http.Header{
		"X-Ratelimit-Limit-Requests":     {"5", "7"},
		"X-Ratelimit-Remaining-Requests": {"", "3"}, // first value wins even when empty
		"X-Ratelimit-Reset-Requests":     {"1s", "junk"},
	}
	got := Parse(200, h, nil, parseNow).Requests
	if want := (Quota{Limit: 5, Remaining: -1, Reset: time.Second}); got != want {
		t.Errorf("Requests = %+v, want %+v", got, want)
	}
}

// When a gateway adds OpenAI-style headers in front of Anthropic, each
// dimension comes from one dialect, never a mix.
func TestParseDialectPrecedence(t *testing.T) {
	h := respHeader(
		"x-ratelimit-limit-tokens", "1000",
		"x-ratelimit-remaining-tokens", "900",
		"x-ratelimit-reset-tokens", "1s",
		"anthropic-ratelimit-tokens-remaining", "50",
		"x-ratelimit-limit-requests", "10",
		"anthropic-ratelimit-requests-limit", "junk",
	)
	o := Parse(200, h, nil, parseNow)
	if want := (Quota{Limit: -1, Remaining: 50, Reset: -1}); o.Tokens != want {
		t.Errorf("Tokens = %+v, want %+v", o.Tokens, want)
	}
	// An Anthropic dimension that is all junk does not hide the other.
	if want := (Quota{Limit: 10, Remaining: -1, Reset: -1}); o.Requests != want {
		t.Errorf("Requests = %+v, want %+v", o.Requests, want)
	}
}

func TestHasQuota(t *testing.T) {
	for _, c := range []struct {
		o    Observation
		want bool
	}{
		{absentObs(200), false},
		{withObs(absentObs(429), func(o *Observation) { o.RetryAfter = time.Second }), false},
		{withObs(absentObs(200), func(o *Observation) { o.Requests.Remaining = 0 }), true},
		{withObs(absentObs(200), func(o *Observation) { o.Tokens.Limit = 1 }), true},
		{withObs(absentObs(200), func(o *Observation) { o.InputTokens.Reset = 0 }), true},
		{withObs(absentObs(200), func(o *Observation) { o.OutputTokens.Remaining = 3 }), true},
	} {
		if got := c.o.HasQuota(); got != c.want {
			t.Errorf("HasQuota(%+v) = %v, want %v", c.o, got, c.want)
		}
	}
}

// TestParseAllocs pins that the per-response path allocates nothing for
// the headers-only dialects, since adaptive mode parses every response.
func TestParseAllocs(t *testing.T) {
	vllm := respHeader("date", "Sun, 01 Jun 2025 12:00:00 GMT", "server", "uvicorn", "content-type", "application/json")
	openAI := openAIHeaders()
	anthropic := respHeader(
		"anthropic-ratelimit-requests-limit", "4000",
		"anthropic-ratelimit-requests-remaining", "3999",
		"anthropic-ratelimit-requests-reset", "2025-06-01T12:00:00.015Z",
		"anthropic-ratelimit-tokens-limit", "480000",
		"anthropic-ratelimit-tokens-remaining", "478000",
		"anthropic-ratelimit-tokens-reset", "2025-06-01T12:00:01Z",
		"retry-after", "3",
	)
	azure := respHeader("retry-after-ms", "9240", "retry-after", "10", "x-ratelimit-remaining-tokens", "0")
	errBody := []byte(`{"error":{"message":"Rate limit reached","type":"tokens","code":"rate_limit_exceeded"}}`)
	for name, f := range map[string]func(){
		"none":      func() { Parse(200, vllm, nil, parseNow) },
		"openai":    func() { Parse(200, openAI, nil, parseNow) },
		"anthropic": func() { Parse(200, anthropic, nil, parseNow) },
		"azure 429": func() { Parse(429, azure, errBody, parseNow) },
		"error body without RetryInfo": func() {
			Parse(429, vllm, errBody, parseNow)
		},
	} {
		if a := testing.AllocsPerRun(100, f); a != 0 {
			t.Errorf("%s: %v allocations per Parse, want 0", name, a)
		}
	}
}

func BenchmarkParseOpenAI(b *testing.B) {
	h := openAIHeaders()
	b.ReportAllocs()
	for b.Loop() {
		Parse(200, h, nil, parseNow)
	}
}

func BenchmarkParseAnthropic(b *testing.B) {
	h := respHeader(
		"date", "Sun, 01 Jun 2025 12:00:00 GMT",
		"content-type", "application/json",
		"anthropic-ratelimit-input-tokens-limit", "400000",
		"anthropic-ratelimit-input-tokens-remaining", "399000",
		"anthropic-ratelimit-input-tokens-reset", "2025-06-01T12:00:01Z",
		"anthropic-ratelimit-output-tokens-limit", "80000",
		"anthropic-ratelimit-output-tokens-remaining", "79000",
		"anthropic-ratelimit-output-tokens-reset", "2025-06-01T12:00:00Z",
		"anthropic-ratelimit-requests-limit", "4000",
		"anthropic-ratelimit-requests-remaining", "3999",
		"anthropic-ratelimit-requests-reset", "2025-06-01T12:00:00Z",
		"anthropic-ratelimit-tokens-limit", "480000",
		"anthropic-ratelimit-tokens-remaining", "478000",
		"anthropic-ratelimit-tokens-reset", "2025-06-01T12:00:01Z",
		"request-id", "req_011CPk1abcdefghijklmnopq",
		"server", "cloudflare",
	)
	b.ReportAllocs()
	for b.Loop() {
		Parse(200, h, nil, parseNow)
	}
}

// BenchmarkParseNoHeaders is the vLLM/Ollama case: nothing to find.
func BenchmarkParseNoHeaders(b *testing.B) {
	h := respHeader("date", "Sun, 01 Jun 2025 12:00:00 GMT", "server", "uvicorn", "content-length", "612", "content-type", "application/json")
	b.ReportAllocs()
	for b.Loop() {
		Parse(200, h, nil, parseNow)
	}
}

func BenchmarkParseGemini429(b *testing.B) {
	body := []byte(`{"error":{"code":429,"message":"You exceeded your current quota.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier","quotaValue":"15"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"34s"}]}}`)
	h := respHeader("content-type", "application/json; charset=UTF-8", "server", "scaffolding on HTTPServer2")
	b.ReportAllocs()
	for b.Loop() {
		Parse(429, h, body, parseNow)
	}
}
