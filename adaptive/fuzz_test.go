package adaptive

import (
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

// FuzzParse feeds arbitrary header values and bodies to Parse and checks
// that it never panics, that everything it reports is within the
// documented bounds, that the two header collectors agree, and that the
// hand-written number and duration parsers agree with strconv and
// time.ParseDuration wherever they accept their input.
func FuzzParse(f *testing.F) {
	f.Add(200, "10000", "6m0s", "2025-06-01T12:00:01Z", "", "", []byte(nil), false)
	f.Add(429, "0", "1m30.5s", "2025-06-01T11:00:00Z", "10", "9240", []byte(nil), true)
	f.Add(429, "-1", "0", "2999-01-01T00:00:00Z", "Sun, 01 Jun 2025 12:00:10 GMT", "1500.5", []byte(nil), false)
	f.Add(429, "99999999999999999999", "12.5", "2025-06-01T14:00:30+02:00", "1.5", "", []byte(`{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"34s"}]}}`), false)
	f.Add(429, "  12 ", "500µs", "junk", "", "", []byte(`[{"error":{"details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"1.500s"}]}}]`), true)
	f.Add(503, "1e3", "-1s", "", "NaN", "-5", []byte(`{"error":{"details":[{"@type":"x/google.rpc.RetryInfo","retryDelay":"-1s"}]}}`), false)
	f.Fuzz(func(t *testing.T, status int, count, dur, ts, retryAfter, retryAfterMs string, body []byte, large bool) {
		h := http.Header{}
		for _, name := range []string{
			"X-Ratelimit-Limit-Requests", "X-Ratelimit-Remaining-Requests",
			"X-Ratelimit-Limit-Tokens", "X-Ratelimit-Remaining-Tokens",
			"Anthropic-Ratelimit-Input-Tokens-Limit", "Anthropic-Ratelimit-Output-Tokens-Remaining",
		} {
			h[name] = []string{count}
		}
		h["X-Ratelimit-Reset-Requests"] = []string{dur}
		h["X-Ratelimit-Reset-Tokens"] = []string{dur, "1s"}
		h["Anthropic-Ratelimit-Input-Tokens-Reset"] = []string{ts}
		h["Retry-After"] = []string{retryAfter}
		h["Retry-After-Ms"] = []string{retryAfterMs}
		if large {
			// Enough unrelated headers to switch collect to lookups.
			for i := range numSlots {
				h["X-Other-"+strconv.Itoa(i)] = []string{count}
			}
		}
		checkCollectors(t, h)

		o := Parse(status, h, body, parseNow)
		if o.Status != status {
			t.Fatalf("Status = %d, want %d", o.Status, status)
		}
		for _, q := range []Quota{o.Requests, o.Tokens, o.InputTokens, o.OutputTokens} {
			checkCountBound(t, q.Limit)
			checkCountBound(t, q.Remaining)
			checkWaitBound(t, q.Reset)
		}
		checkWaitBound(t, o.RetryAfter)
		if again := Parse(status, h, body, parseNow); again != o {
			t.Fatalf("Parse is not deterministic: %+v then %+v", o, again)
		}
		if o.Requests.Limit != parseCount(count) || o.Requests.Reset != parseGoDuration(dur) {
			t.Fatalf("Requests = %+v for count %q, reset %q", o.Requests, count, dur)
		}

		// parseCount against strconv: it accepts exactly the strings of
		// ASCII digits (after OWS), with the documented clamp.
		c := trimOWS(count)
		n, err := strconv.ParseInt(c, 10, 64)
		digits := c != "" && strings.Trim(c, "0123456789") == ""
		switch got := parseCount(count); {
		case digits && err == nil:
			if want := min(n, MaxCount); got != want {
				t.Fatalf("parseCount(%q) = %d, want %d", count, got, want)
			}
		case got != -1:
			t.Fatalf("parseCount(%q) = %d, want -1 (absent)", count, got)
		}

		// parseGoDuration against time.ParseDuration: whatever it accepts
		// with units, Go accepts with the same value, unless Go overflows
		// where it saturates. (It rejects some forms Go accepts, such as
		// a sign or ".5s", which no provider sends.)
		if got := parseGoDuration(dur); got >= 0 {
			d := trimOWS(dur)
			if strings.Trim(d, "0123456789.") == "" {
				return // bare seconds, not a Go duration
			}
			want, err := time.ParseDuration(d)
			switch {
			case err != nil:
				if got != MaxWait {
					t.Fatalf("parseGoDuration(%q) = %v, time.ParseDuration: %v", dur, got, err)
				}
			case want > MaxWait:
				if got != MaxWait {
					t.Fatalf("parseGoDuration(%q) = %v, want MaxWait (Go: %v)", dur, got, want)
				}
			case want < 0 || got-want > 1 || want-got > 1:
				// Go sums fractions in floating point; allow its rounding.
				t.Fatalf("parseGoDuration(%q) = %v, time.ParseDuration = %v", dur, got, want)
			}
		}
	})
}

func checkCountBound(t *testing.T, n int64) {
	t.Helper()
	if n < -1 || n > MaxCount {
		t.Fatalf("count %d out of [-1, MaxCount]", n)
	}
}

func checkWaitBound(t *testing.T, d time.Duration) {
	t.Helper()
	if d < -1 || d > MaxWait {
		t.Fatalf("duration %v out of [-1, MaxWait]", d)
	}
}
