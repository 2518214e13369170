// This file reads what one upstream response says about the upstream's
// rate limits. Providers report them in different dialects:
//
//   - OpenAI and Azure OpenAI: x-ratelimit-{limit,remaining,reset}-{requests,tokens},
//     resets as Go durations ("6m0s", "20ms") or plain seconds ("12");
//     Azure also sends -1 for "unknown" and retry-after-ms on 429s.
//   - Anthropic: anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset},
//     resets as RFC 3339 timestamps.
//   - Everyone: retry-after (RFC 9110 delta-seconds or HTTP-date) and the
//     finer retry-after-ms that OpenAI's and Azure's SDKs read.
//   - Gemini: no headers; a 429's JSON body carries a google.rpc.RetryInfo
//     detail whose retryDelay is a protobuf Duration ("34s", "1.500s").
//
// Every value is untrusted text from another server: anything that does not
// parse is reported as absent rather than guessed at, and what does parse is
// clamped to bounds the limiter can do arithmetic on.
//
// This is a file comment, not the package comment, which is in learner.go.

package adaptive

import (
	"bytes"
	"net/http"
	"strings"
	"time"

	"github.com/valyala/fastjson"
)

// Bounds applied to what upstreams report. Values past them are clamped,
// not dropped: a limit of 5e12 tokens still means "practically unlimited",
// and a retry-after of a week still means "stop for as long as we care to".
const (
	// MaxCount is the largest Limit or Remaining reported. It matches the
	// limiter's largest bucket (bucket.maxUnits), so a reported limit can
	// always be turned into a bucket without overflow checks.
	MaxCount = 1_000_000_000_000
	// MaxWait is the longest Reset or RetryAfter reported. A longer wait is
	// far more likely to be a broken header than a real instruction, and a
	// day is already longer than any adaptive decision should hold.
	MaxWait = 24 * time.Hour
	// MaxBody is how much of an error body Parse looks at. Rate-limit
	// error bodies are a few hundred bytes; the bound keeps a huge or
	// hostile body from costing more than a small parse.
	MaxBody = 64 << 10
)

// Quota is one dimension (requests, tokens, input tokens or output tokens)
// as the upstream reports it. Each field is independent: providers omit
// some (Azure sends remaining without limit), so the consumer must check
// each for -1 rather than assume a complete triple.
type Quota struct {
	// Limit is the advertised limit, per minute for OpenAI, Azure and
	// Anthropic RPM/TPM limits; -1 when absent. At most MaxCount.
	Limit int64
	// Remaining is what is left of Limit; -1 when absent. 0 is a real
	// value: the quota is empty. At most MaxCount.
	Remaining int64
	// Reset is the time until the quota is whole again; -1 when absent.
	// 0 means now (also for a reset timestamp already in the past). At
	// most MaxWait.
	Reset time.Duration
}

// absentQuota is a Quota with nothing reported.
var absentQuota = Quota{Limit: -1, Remaining: -1, Reset: -1}

// present reports whether any field of q was reported.
func (q Quota) present() bool { return q.Limit >= 0 || q.Remaining >= 0 || q.Reset >= 0 }

// Observation is what one upstream response says about the upstream's
// limits. Parse fills it from the headers (and a 429's body for Gemini);
// fields not reported are -1 so that "absent" and "zero" stay distinct.
type Observation struct {
	// Status is the response's HTTP status, passed through so the
	// consumer can tell a 429's RetryAfter from an informational one.
	Status int
	// Requests is the request-count quota (RPM).
	Requests Quota
	// Tokens is the combined token quota: OpenAI/Azure
	// x-ratelimit-*-tokens, Anthropic anthropic-ratelimit-tokens-*.
	Tokens Quota
	// InputTokens is Anthropic's input-token quota
	// (anthropic-ratelimit-input-tokens-*).
	InputTokens Quota
	// OutputTokens is Anthropic's output-token quota
	// (anthropic-ratelimit-output-tokens-*).
	OutputTokens Quota
	// RetryAfter is how long the upstream asks clients to wait; -1 when
	// absent, at most MaxWait. Sources in order of preference:
	// retry-after-ms (finer), retry-after (delta seconds, possibly
	// fractional, or an HTTP-date taken relative to now; a date in the
	// past gives 0), then for error statuses Gemini's RetryInfo
	// retryDelay in the JSON body.
	RetryAfter time.Duration
}

// HasQuota reports whether any quota field was present, so that a consumer
// can skip responses from upstreams (vLLM, Ollama) that say nothing about
// their limits. RetryAfter alone does not count: it says when to retry,
// not how large the quota is.
func (o Observation) HasQuota() bool {
	return o.Requests.present() || o.Tokens.present() || o.InputTokens.present() || o.OutputTokens.present()
}

// Canonical spellings of the header names Parse reads (the full list is
// headerNames). Parse indexes the header map with canonical names or
// compares its keys with them, which finds exactly what http.Header.Get
// would: net/http canonicalizes the keys of every response it reads, and
// Get canonicalizes the name it is given.
const (
	hOpenAIPrefix    = "X-Ratelimit-"         // + Limit|Remaining|Reset-Requests|Tokens
	hAnthropicPrefix = "Anthropic-Ratelimit-" // + Requests|Tokens|Input-Tokens|Output-Tokens-Limit|Remaining|Reset
	hRetryAfter      = "Retry-After"
	hRetryAfterMs    = "Retry-After-Ms"
)

// Slots for the raw header values Parse collects before parsing any: three
// per quota (see fLimit, fRemaining, fReset), then the two retry headers.
const (
	slotOpenAIRequests = 3 * iota
	slotOpenAITokens
	slotAnthropicRequests
	slotAnthropicTokens
	slotAnthropicInput
	slotAnthropicOutput
	numQuotaSlots
)

const (
	slotRetryAfterMs = numQuotaSlots + iota
	slotRetryAfter
	numSlots
)

// Offsets of the fields within a quota's three slots.
const (
	fLimit = iota
	fRemaining
	fReset
)

// Parse reads what a response says about the upstream's rate limits: h is
// the response header, body the beginning of the response body (only looked
// at for error statuses, and only its first MaxBody bytes; nil is fine), and
// now the time the response arrived, against which timestamps become
// durations.
//
// Parse never fails: values missing or malformed are -1 in the result.
// When a dimension is reported in both the Anthropic and the OpenAI
// dialect (a gateway adding its own headers), the Anthropic one wins as a
// whole, so that one Quota never mixes two sources.
//
// Adaptive mode calls Parse on every response, so a response without
// rate-limit headers costs about as much as a few map lookups, and the
// forms providers actually send are read without allocating (malformed
// timestamps and dates may cost the time package's error allocation).
func Parse(status int, h http.Header, body []byte, now time.Time) Observation {
	var raw [numSlots]string
	if !collect(h, &raw) && (status < 400 || len(body) == 0) {
		// The common case for upstreams that report nothing.
		o := Observation{Status: status, RetryAfter: -1}
		o.Requests, o.Tokens, o.InputTokens, o.OutputTokens = absentQuota, absentQuota, absentQuota, absentQuota
		return o
	}

	o := Observation{
		Status:       status,
		Requests:     pickQuota(&raw, slotAnthropicRequests, slotOpenAIRequests, now),
		Tokens:       pickQuota(&raw, slotAnthropicTokens, slotOpenAITokens, now),
		InputTokens:  anthropicQuota(&raw, slotAnthropicInput, now),
		OutputTokens: anthropicQuota(&raw, slotAnthropicOutput, now),
		RetryAfter:   -1,
	}

	if d, ok := parseDecimal(raw[slotRetryAfterMs], time.Millisecond); ok {
		o.RetryAfter = d
	} else if d, ok := parseRetryAfter(raw[slotRetryAfter], now); ok {
		o.RetryAfter = d
	} else if status >= 400 && len(body) > 0 {
		if d, ok := geminiRetryDelay(body); ok {
			o.RetryAfter = d
		}
	}
	return o
}

// headerNames are the canonical names of the headers in each slot, for
// collectLookup.
var headerNames = [numSlots]string{
	slotOpenAIRequests + fLimit:        "X-Ratelimit-Limit-Requests",
	slotOpenAIRequests + fRemaining:    "X-Ratelimit-Remaining-Requests",
	slotOpenAIRequests + fReset:        "X-Ratelimit-Reset-Requests",
	slotOpenAITokens + fLimit:          "X-Ratelimit-Limit-Tokens",
	slotOpenAITokens + fRemaining:      "X-Ratelimit-Remaining-Tokens",
	slotOpenAITokens + fReset:          "X-Ratelimit-Reset-Tokens",
	slotAnthropicRequests + fLimit:     "Anthropic-Ratelimit-Requests-Limit",
	slotAnthropicRequests + fRemaining: "Anthropic-Ratelimit-Requests-Remaining",
	slotAnthropicRequests + fReset:     "Anthropic-Ratelimit-Requests-Reset",
	slotAnthropicTokens + fLimit:       "Anthropic-Ratelimit-Tokens-Limit",
	slotAnthropicTokens + fRemaining:   "Anthropic-Ratelimit-Tokens-Remaining",
	slotAnthropicTokens + fReset:       "Anthropic-Ratelimit-Tokens-Reset",
	slotAnthropicInput + fLimit:        "Anthropic-Ratelimit-Input-Tokens-Limit",
	slotAnthropicInput + fRemaining:    "Anthropic-Ratelimit-Input-Tokens-Remaining",
	slotAnthropicInput + fReset:        "Anthropic-Ratelimit-Input-Tokens-Reset",
	slotAnthropicOutput + fLimit:       "Anthropic-Ratelimit-Output-Tokens-Limit",
	slotAnthropicOutput + fRemaining:   "Anthropic-Ratelimit-Output-Tokens-Remaining",
	slotAnthropicOutput + fReset:       "Anthropic-Ratelimit-Output-Tokens-Reset",
	slotRetryAfterMs:                   hRetryAfterMs,
	slotRetryAfter:                     hRetryAfter,
}

// collect copies into raw the first value of each header Parse reads, and
// reports whether it found any.
// Non-canonical keys are ignored in both strategies, exactly as
// http.Header.Get would ignore them.
//
// Visiting one map entry costs about as much as one lookup (which hashes
// the whole name), so small maps are walked and large ones probed: most
// responses from vLLM or Ollama have a handful of headers and none of
// ours, while OpenAI's have two dozen. The walk is what keeps the
// no-header case cheap.
func collect(h http.Header, raw *[numSlots]string) bool {
	if len(h) > numSlots {
		return collectLookup(h, raw)
	}
	return collectWalk(h, raw)
}

// collectLookup looks up each of the names in headerNames.
func collectLookup(h http.Header, raw *[numSlots]string) (found bool) {
	for i, name := range headerNames {
		if v := h[name]; len(v) > 0 {
			raw[i], found = v[0], true
		}
	}
	return found
}

// collectWalk visits each header once, rejecting most on their first byte.
func collectWalk(h http.Header, raw *[numSlots]string) (found bool) {
	for k, v := range h {
		if len(v) == 0 || len(k) < len(hRetryAfter) {
			continue
		}
		switch k[0] {
		case 'X':
			if strings.HasPrefix(k, hOpenAIPrefix) {
				if i := openAISlot(k[len(hOpenAIPrefix):]); i >= 0 {
					raw[i], found = v[0], true
				}
			}
		case 'A':
			if strings.HasPrefix(k, hAnthropicPrefix) {
				if i := anthropicSlot(k[len(hAnthropicPrefix):]); i >= 0 {
					raw[i], found = v[0], true
				}
			}
		case 'R':
			switch k {
			case hRetryAfter:
				raw[slotRetryAfter], found = v[0], true
			case hRetryAfterMs:
				raw[slotRetryAfterMs], found = v[0], true
			}
		}
	}
	return found
}

// openAISlot maps the rest of an X-Ratelimit- name to its slot, or -1.
func openAISlot(rest string) int {
	switch rest {
	case "Limit-Requests":
		return slotOpenAIRequests + fLimit
	case "Remaining-Requests":
		return slotOpenAIRequests + fRemaining
	case "Reset-Requests":
		return slotOpenAIRequests + fReset
	case "Limit-Tokens":
		return slotOpenAITokens + fLimit
	case "Remaining-Tokens":
		return slotOpenAITokens + fRemaining
	case "Reset-Tokens":
		return slotOpenAITokens + fReset
	}
	return -1
}

// anthropicSlot maps the rest of an Anthropic-Ratelimit- name to its slot,
// or -1.
func anthropicSlot(rest string) int {
	var base int
	switch {
	case strings.HasPrefix(rest, "Requests-"):
		base, rest = slotAnthropicRequests, rest[len("Requests-"):]
	case strings.HasPrefix(rest, "Tokens-"):
		base, rest = slotAnthropicTokens, rest[len("Tokens-"):]
	case strings.HasPrefix(rest, "Input-Tokens-"):
		base, rest = slotAnthropicInput, rest[len("Input-Tokens-"):]
	case strings.HasPrefix(rest, "Output-Tokens-"):
		base, rest = slotAnthropicOutput, rest[len("Output-Tokens-"):]
	default:
		return -1
	}
	switch rest {
	case "Limit":
		return base + fLimit
	case "Remaining":
		return base + fRemaining
	case "Reset":
		return base + fReset
	}
	return -1
}

// pickQuota returns the Anthropic quota at slot a if any of its fields
// parsed, else the OpenAI quota at slot b.
func pickQuota(raw *[numSlots]string, a, b int, now time.Time) Quota {
	if q := anthropicQuota(raw, a, now); q.present() {
		return q
	}
	return Quota{
		Limit:     parseCount(raw[b+fLimit]),
		Remaining: parseCount(raw[b+fRemaining]),
		Reset:     parseGoDuration(raw[b+fReset]),
	}
}

// anthropicQuota parses the Anthropic quota at slot i, whose reset is an
// RFC 3339 timestamp.
func anthropicQuota(raw *[numSlots]string, i int, now time.Time) Quota {
	if raw[i+fLimit] == "" && raw[i+fRemaining] == "" && raw[i+fReset] == "" {
		return absentQuota
	}
	return Quota{
		Limit:     parseCount(raw[i+fLimit]),
		Remaining: parseCount(raw[i+fRemaining]),
		Reset:     parseTimestamp(raw[i+fReset], now),
	}
}

// trimOWS strips the optional whitespace (SP and HTAB) that RFC 9110 says
// is not part of a field value. net/http already strips it from what it
// reads, but a header built by other code may still carry it.
func trimOWS(s string) string {
	for len(s) > 0 && (s[0] == ' ' || s[0] == '\t') {
		s = s[1:]
	}
	for len(s) > 0 && (s[len(s)-1] == ' ' || s[len(s)-1] == '\t') {
		s = s[:len(s)-1]
	}
	return s
}

// parseCount parses a Limit or Remaining: plain decimal digits, nothing
// else (no sign, exponent or fraction, which no provider sends and which
// would only hide a broken header). It returns -1 for anything else,
// including Azure's -1 for "unknown" and values beyond int64; values above
// MaxCount become MaxCount.
func parseCount(s string) int64 {
	s = trimOWS(s)
	if s == "" {
		return -1
	}
	var n uint64
	for i := 0; i < len(s); i++ {
		c := s[i] - '0'
		if c > 9 {
			return -1
		}
		// Overflow of int64 makes the value absent, not clamped: a
		// number that large is not a count any upstream meant.
		if n > (1<<63-1-uint64(c))/10 {
			return -1
		}
		n = n*10 + uint64(c)
	}
	return int64(min(n, MaxCount))
}

// clampWait bounds a non-negative wait to MaxWait.
func clampWait(d time.Duration) time.Duration { return min(d, MaxWait) }

// parseDecimal parses a non-negative decimal number (digits, optionally a
// point and more digits) as a count of unit, and clamps it to MaxWait. It
// works in integers so that "1.5" and "1500" ms are exactly equal, and
// saturates instead of failing on huge values: RFC 9110 §1.2.2 asks that
// a delta-seconds beyond what the recipient can represent be taken as the
// largest it can, and a huge wait still means "wait long".
func parseDecimal(s string, unit time.Duration) (time.Duration, bool) {
	s = trimOWS(s)
	d, rest, ok := leadingDecimal(s, unit)
	if !ok || rest != "" {
		return -1, false
	}
	return clampWait(d), true
}

// leadingDecimal parses the decimal number at the start of s as a count of
// unit and returns the rest of s. At least one digit must precede any
// point, and a point must be followed by a digit. Digits past nanosecond
// precision are checked but dropped. The result saturates above MaxWait.
func leadingDecimal(s string, unit time.Duration) (d time.Duration, rest string, ok bool) {
	i := 0
	var whole uint64
	for ; i < len(s) && s[i]-'0' <= 9; i++ {
		// Once past MaxWait the exact value no longer matters; stop
		// growing so it cannot overflow.
		if whole <= uint64(MaxWait) {
			whole = whole*10 + uint64(s[i]-'0')
		}
	}
	if i == 0 {
		return 0, s, false
	}
	var frac time.Duration
	if i < len(s) && s[i] == '.' {
		i++
		start := i
		scale := unit
		for ; i < len(s) && s[i]-'0' <= 9; i++ {
			scale /= 10
			frac += time.Duration(s[i]-'0') * scale
		}
		if i == start {
			return 0, s, false
		}
	}
	if whole > uint64(MaxWait/unit) {
		return MaxWait + 1, s[i:], true
	}
	return time.Duration(whole)*unit + frac, s[i:], true
}

// parseGoDuration parses an OpenAI-style reset: a Go duration ("6m0s",
// "20ms", "1m30.5s", "0s"), or a bare number of seconds ("12", "0.5") as
// Azure sends. It returns -1 for anything else, including a sign (a
// negative reset is meaningless) and forms Go's String never produces.
// Results above MaxWait become MaxWait.
func parseGoDuration(s string) time.Duration {
	s = trimOWS(s)
	if s == "" {
		return -1
	}
	if d, ok := parseDecimal(s, time.Second); ok {
		return d
	}
	var total time.Duration
	for s != "" {
		// The unit follows the number, so find where the number ends,
		// read the unit, then parse the number as a count of it: the
		// fraction of "1.5h" then keeps full nanosecond precision.
		end := 0
		for end < len(s) && (s[end]-'0' <= 9 || s[end] == '.') {
			end++
		}
		num, s2 := s[:end], s[end:]
		unit, ulen := durationUnit(s2)
		if ulen == 0 {
			return -1
		}
		d, rest, ok := leadingDecimal(num, unit)
		if !ok || rest != "" {
			return -1
		}
		total += d
		if total > MaxWait {
			// Keep validating the rest, but the value is settled; the
			// cap also keeps the sum from overflowing.
			total = MaxWait + 1
		}
		s = s2[ulen:]
	}
	return clampWait(total)
}

// durationUnit reads the unit at the start of s, as time.ParseDuration
// knows them, returning its length in bytes (0 if none).
func durationUnit(s string) (time.Duration, int) {
	switch {
	case strings.HasPrefix(s, "ns"):
		return time.Nanosecond, 2
	case strings.HasPrefix(s, "us"):
		return time.Microsecond, 2
	case strings.HasPrefix(s, "µs"): // U+00B5 micro sign
		return time.Microsecond, len("µs")
	case strings.HasPrefix(s, "μs"): // U+03BC Greek mu
		return time.Microsecond, len("μs")
	case strings.HasPrefix(s, "ms"):
		return time.Millisecond, 2
	case strings.HasPrefix(s, "s"):
		return time.Second, 1
	case strings.HasPrefix(s, "m"):
		return time.Minute, 1
	case strings.HasPrefix(s, "h"):
		return time.Hour, 1
	}
	return 0, 0
}

// parseTimestamp parses an Anthropic reset, an RFC 3339 timestamp, into
// the time from now until it; -1 if it does not parse, 0 if it has passed
// (the quota is already whole), at most MaxWait.
func parseTimestamp(s string, now time.Time) time.Duration {
	s = trimOWS(s)
	if s == "" {
		return -1
	}
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return -1
	}
	return untilClamped(t, now)
}

// untilClamped is t-now bounded to [0, MaxWait]. Sub saturates, so
// timestamps centuries away cannot overflow.
func untilClamped(t, now time.Time) time.Duration {
	return clampWait(max(t.Sub(now), 0))
}

// parseRetryAfter parses a retry-after value: RFC 9110 delta-seconds,
// leniently allowing a fraction ("1.5") as some servers send, or an
// HTTP-date taken relative to now (a date in the past means 0).
func parseRetryAfter(s string, now time.Time) (time.Duration, bool) {
	s = trimOWS(s)
	if s == "" {
		return -1, false
	}
	if d, ok := parseDecimal(s, time.Second); ok {
		return d, true
	}
	// Only a date can start with a letter; checking first keeps junk
	// such as "-1" or "1e3" from paying for three failed time.Parse calls.
	if c := s[0] | 0x20; c < 'a' || c > 'z' {
		return -1, false
	}
	t, err := http.ParseTime(s)
	if err != nil {
		return -1, false
	}
	return untilClamped(t, now), true
}

// geminiParsers recycles the JSON parsers for Gemini error bodies.
var geminiParsers fastjson.ParserPool

// Markers of a Gemini RetryInfo in an error body. The body is searched for
// retryDelayKey before it is parsed, so that error bodies from other
// upstreams cost one byte search and no JSON parse.
var (
	retryDelayKey = []byte(`"retryDelay"`)
	retryInfoType = []byte("google.rpc.RetryInfo")
)

// geminiRetryDelay finds the retryDelay of a google.rpc.RetryInfo detail
// in a Gemini error body: {"error":{"details":[{"@type":
// "type.googleapis.com/google.rpc.RetryInfo","retryDelay":"34s"}]}}, or an
// array of such objects as the streaming endpoint sends. Only the first
// MaxBody bytes are looked at; a body cut there does not parse and yields
// nothing, which is fine since real ones are far smaller.
func geminiRetryDelay(body []byte) (time.Duration, bool) {
	if len(body) > MaxBody {
		body = body[:MaxBody]
	}
	if !bytes.Contains(body, retryDelayKey) {
		return -1, false
	}
	p := geminiParsers.Get()
	defer geminiParsers.Put(p)
	root, err := p.ParseBytes(body)
	if err != nil {
		return -1, false
	}
	if root.Type() == fastjson.TypeArray {
		// Each element is a complete error object; the first with a
		// RetryInfo speaks for the response.
		for _, el := range root.GetArray() {
			if d, ok := retryInfoDelay(el); ok {
				return d, true
			}
		}
		return -1, false
	}
	return retryInfoDelay(root)
}

// retryInfoDelay reads error.details[].retryDelay from one error object.
func retryInfoDelay(v *fastjson.Value) (time.Duration, bool) {
	for _, d := range v.GetArray("error", "details") {
		// The type URL's host part may vary (the API documents only
		// that it ends in the message's full name), so match the end.
		if !bytes.HasSuffix(d.GetStringBytes("@type"), retryInfoType) {
			continue
		}
		if dur, ok := parseProtoDuration(d.GetStringBytes("retryDelay")); ok {
			return dur, true
		}
	}
	return -1, false
}

// parseProtoDuration parses the JSON form of a google.protobuf.Duration:
// seconds with an optional fraction, suffixed with "s" ("34s", "1.500s").
// Negative durations are rejected as meaningless waits.
func parseProtoDuration(b []byte) (time.Duration, bool) {
	if len(b) < 2 || b[len(b)-1] != 's' {
		return -1, false
	}
	return parseDecimal(string(b[:len(b)-1]), time.Second)
}
