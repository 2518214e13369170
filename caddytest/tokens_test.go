package caddytest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode"

	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
)

// Token limits through a real Caddy, in front of a fake upstream whose
// reported usage is fixed. The limits are per day so that the assertions
// can be exact: 10000 tokens per day refill one token every 8.64 s, and the
// remaining count is rounded down, so a bucket read within 8.64 s of its
// first charge shows exactly what was charged.

const (
	tokCap    = 10000
	tokPolicy = "tpd/tokens_per_day"
	// tokInterval is how long one token of tokCap per day takes to refill.
	tokInterval = 24 * time.Hour / tokCap
	// fakePrompt and fakeCompletion are the usage the fake upstream reports.
	fakePrompt     = 20
	fakeCompletion = 30
	fakeUsage      = fakePrompt + fakeCompletion
	// fakeTextTokens is the text of a three-chunk fake response, "fake1
	// fake2 fake3": 17 characters, 5 tokens at 4 characters per token.
	fakeTextTokens = 5
	// fake1Tokens is the first chunk alone: "fake1", 2 tokens.
	fake1Tokens = 2
	// defaultCompletion is the completion estimate of a request that names
	// no maximum.
	defaultCompletion = 1024
)

// estPrompt is the documented prompt estimate, computed independently of the
// module: CJK runes (Han, Kana, Hangul) count one token each, the other runes
// four to a token, rounded up; any text costs at least one token.
func estPrompt(texts ...string) int64 {
	var chars, cjk int64
	for _, s := range texts {
		for _, r := range s {
			chars++
			if unicode.In(r, unicode.Han, unicode.Hiragana, unicode.Katakana, unicode.Hangul) {
				cjk++
			}
		}
	}
	if chars == 0 {
		return 0
	}
	return max(cjk+(chars-cjk+3)/4, 1)
}

// tokenBlock is the handler block of most token tests: one 10000
// tokens-per-day bucket per X-Case header value, so that every case has a
// fresh bucket.
func tokenBlock(extra string) string {
	return `
		user {http.request.header.X-Case}
` + extra + `
		rule tpd {
			limit 10000 tokens_per_day
			applies_per user
		}`
}

// sibling is a harness for another site of the same configuration, on its
// own port. Tests load one configuration with every site they need, since a
// reload can reset a connection the client just opened.
func (h *harness) sibling(port int) *harness {
	c := *h
	c.port, c.base = port, fmt.Sprintf("http://127.0.0.1:%d", port)
	return &c
}

// level reads the tpd bucket of user through a request that charges no
// tokens: a POST to a path no dialect claims (the upstream answers 404).
func (h *harness) level(t testing.TB, user string) int64 {
	t.Helper()
	r := h.post("/v1/models", "", "X-Case", user)
	if r.status != http.StatusNotFound {
		t.Fatalf("level probe for %q: status %d, want the upstream's 404: %s", user, r.status, truncate(string(r.body), 300))
	}
	l := remaining(t, r, tokPolicy)
	// And no other policy applied.
	wantRemaining(t, "level probe "+user, r, map[string]int64{tokPolicy: l})
	return l
}

// waitLevelChange polls the level of user until it differs from from, and
// returns it. Settlement is one correction, so the first new value is the
// final one.
func (h *harness) waitLevelChange(t testing.TB, user string, from int64, wait time.Duration) int64 {
	t.Helper()
	deadline := time.Now().Add(wait)
	for {
		l := h.level(t, user)
		if l != from {
			return l
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: the level stayed at %d, the charge at admission, for %s: the request was never settled", user, l, wait)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// timed is a response read as it arrived.
type timed struct {
	response
	// at is when each watched piece first appeared, from the request's
	// start; end is when the body ended.
	at  map[string]time.Duration
	end time.Duration
}

var fakePieces = []string{"fake1", "fake2", "fake3"}

// postTimed sends a POST and reads the response as it streams, noting when
// each piece first appears.
func (h *harness) postTimed(t testing.TB, path, body string, hdr ...string) timed {
	t.Helper()
	req := h.newReq(http.MethodPost, path, strings.NewReader(body), hdr...)
	start := time.Now()
	res, err := h.client.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	defer res.Body.Close()
	out := timed{response: response{status: res.StatusCode, header: res.Header}, at: map[string]time.Duration{}}
	buf := make([]byte, 32<<10)
	for {
		n, err := res.Body.Read(buf)
		out.body = append(out.body, buf[:n]...)
		for _, p := range fakePieces {
			if _, ok := out.at[p]; !ok && bytes.Contains(out.body, []byte(p)) {
				out.at[p] = time.Since(start)
			}
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("POST %s: reading the body: %v", path, err)
		}
	}
	out.end = time.Since(start)
	return out
}

// wantIncremental checks that a stream's chunks reached the client as the
// upstream produced them, ChunkDelay apart, and not all at once at the end.
func wantIncremental(t *testing.T, what string, r timed, delay time.Duration) {
	t.Helper()
	first, ok1 := r.at["fake1"]
	last, ok3 := r.at["fake3"]
	if !ok1 || !ok3 {
		t.Errorf("%s: the stream lacks its chunks: %s", what, truncate(string(r.body), 500))
		return
	}
	// The upstream waits 2 × delay between the first and third chunks;
	// a buffered stream would show them at the same moment.
	if last-first < delay || r.end-first < delay {
		t.Errorf("%s: fake1 arrived at %s, fake3 at %s, the end at %s: want the chunks %s or more apart, as streamed",
			what, first, last, r.end, delay)
	}
}

// tokCase is one request whose token charge is checked.
type tokCase struct {
	name, path, body string
	hdr              []string
	// prompt and completion are the admission estimate; settled is the
	// charge after settlement.
	prompt, completion, settled int64
	stream                      bool
	// want is something the client must receive (e.g. the usage chunk).
	want string
}

// runTokCase sends c as user c.name and checks the charge at admission and
// after settlement exactly, and that a stream was not buffered.
func runTokCase(t *testing.T, h *harness, up *fakellm.Server, c tokCase, delay time.Duration) timed {
	t.Helper()
	before := len(up.Requests())
	hdr := append([]string{"X-Case", c.name}, c.hdr...)
	r := h.postTimed(t, c.path, c.body, hdr...)
	wantStatus(t, c.name, r.response, http.StatusOK)
	wantRemaining(t, c.name+" at admission", r.response, map[string]int64{tokPolicy: tokCap - c.prompt - c.completion})
	if c.want != "" && !strings.Contains(string(r.body), c.want) {
		t.Errorf("%s: the client did not get %s: %s", c.name, c.want, truncate(string(r.body), 2000))
	}
	if c.stream {
		wantIncremental(t, c.name, r, delay)
	} else if !strings.Contains(c.path, "embed") && len(r.at) != len(fakePieces) {
		t.Errorf("%s: body lacks the generated text: %s", c.name, truncate(string(r.body), 500))
	}
	got := requestsSince(up, before)
	if len(got) != 1 || got[0].BodySHA256 != sha([]byte(c.body)) {
		t.Errorf("%s: upstream saw %d requests, want 1 with the body unchanged", c.name, len(got))
	}
	// The next request sees the settled level: the handler settles before
	// it returns.
	if l := h.level(t, c.name); l != tokCap-c.settled {
		t.Errorf("%s: after settlement r=%d, want %d (charged %d, want %d; estimate was %d)",
			c.name, l, tokCap-c.settled, tokCap-l, c.settled, c.prompt+c.completion)
	}
	return r
}

// Every dialect, streamed and not: the estimate is charged at admission and
// corrected to the usage the upstream reported (20 prompt + 30 completion)
// before the next request; streams reach the client unbuffered.
func TestTokenSettlementPerDialect(t *testing.T) {
	const delay = 40 * time.Millisecond
	up := startFake(t, fakellm.Config{PromptTokens: fakePrompt, CompletionTokens: fakeCompletion, ChunkDelay: delay})
	h := newHarness(t)
	h.loadHandler(tokenBlock(""), up)

	usageChunk := `"usage":{"completion_tokens":30,"prompt_tokens":20,"total_tokens":50}`
	cases := []tokCase{
		{
			name: "openai chat",
			body: `{"model":"gpt-4o","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello to the world."}]}`,
			path: "/v1/chat/completions", prompt: estPrompt("You are terse.", "Say hello to the world."), completion: defaultCompletion,
			settled: fakeUsage,
		},
		{
			// max_tokens × n.
			name: "openai chat stream",
			body: `{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"max_tokens":200,"n":2,"messages":[{"role":"user","content":"Count to three."}]}`,
			path: "/v1/chat/completions", prompt: estPrompt("Count to three."), completion: 400,
			settled: fakeUsage, stream: true, want: usageChunk,
		},
		{
			// max_completion_tokens wins over max_tokens.
			name: "openai completions",
			body: `{"model":"gpt-3.5-turbo-instruct","prompt":"Once upon a time","max_tokens":500,"max_completion_tokens":64}`,
			path: "/v1/completions", prompt: estPrompt("Once upon a time"), completion: 64, settled: fakeUsage,
		},
		{
			// best_of counts as choices.
			name: "openai completions stream",
			body: `{"model":"gpt-3.5-turbo-instruct","prompt":["Roses are red,","violets are"],"max_tokens":10,"best_of":3,"stream":true,"stream_options":{"include_usage":true}}`,
			path: "/v1/completions", prompt: estPrompt("Roses are red,", "violets are"), completion: 30,
			settled: fakeUsage, stream: true, want: usageChunk,
		},
		{
			// Embeddings generate nothing: the estimate is the prompt, and
			// the settlement the reported prompt.
			name: "openai embeddings",
			body: `{"model":"text-embedding-3-small","input":["alpha beta","gamma"]}`,
			path: "/v1/embeddings", prompt: estPrompt("alpha beta", "gamma"), completion: 0, settled: fakePrompt,
		},
		{
			name: "responses",
			body: `{"model":"gpt-4o","instructions":"Be kind.","input":"What is two plus two?","max_output_tokens":100}`,
			path: "/v1/responses", prompt: estPrompt("Be kind.", "What is two plus two?"), completion: 100, settled: fakeUsage,
		},
		{
			name: "responses stream",
			body: `{"model":"gpt-4o","stream":true,"input":[{"role":"user","content":[{"type":"input_text","text":"Tell me a story."}]}]}`,
			path: "/v1/responses", prompt: estPrompt("Tell me a story."), completion: defaultCompletion,
			settled: fakeUsage, stream: true, want: `"type":"response.completed"`,
		},
		{
			name:   "azure chat",
			body:   `{"messages":[{"role":"user","content":"Hello from Azure."}],"max_tokens":77}`,
			path:   "/openai/deployments/my-dep/chat/completions?api-version=2024-06-01",
			prompt: estPrompt("Hello from Azure."), completion: 77, settled: fakeUsage,
		},
		{
			name:   "azure chat stream",
			body:   `{"messages":[{"role":"user","content":"Stream from Azure."}],"stream":true,"stream_options":{"include_usage":true}}`,
			path:   "/openai/deployments/my-dep/chat/completions?api-version=2024-06-01",
			prompt: estPrompt("Stream from Azure."), completion: defaultCompletion, settled: fakeUsage, stream: true, want: usageChunk,
		},
		{
			name: "anthropic",
			body: `{"model":"claude-3-5-sonnet","max_tokens":256,"system":"Be concise.","messages":[{"role":"user","content":"Hi there, Claude!"}]}`,
			path: "/v1/messages", hdr: []string{"anthropic-version", "2023-06-01"},
			prompt: estPrompt("Be concise.", "Hi there, Claude!"), completion: 256, settled: fakeUsage,
		},
		{
			// message_start reports the input, message_delta the output.
			name: "anthropic stream",
			body: `{"model":"claude-3-5-sonnet","max_tokens":100,"stream":true,"messages":[{"role":"user","content":[{"type":"text","text":"Stream, please."}]}]}`,
			path: "/v1/messages", hdr: []string{"anthropic-version", "2023-06-01"},
			prompt: estPrompt("Stream, please."), completion: 100, settled: fakeUsage, stream: true, want: `"type":"message_delta"`,
		},
		{
			// CJK counts one token per character; candidateCount
			// multiplies the maximum.
			name:   "gemini",
			body:   `{"contents":[{"role":"user","parts":[{"text":"hello 你好"}]}],"generationConfig":{"maxOutputTokens":50,"candidateCount":2}}`,
			path:   "/v1beta/models/gemini-1.5-flash:generateContent",
			prompt: 4, completion: 100, settled: fakeUsage,
		},
		{
			name:   "gemini stream sse",
			body:   `{"systemInstruction":{"parts":[{"text":"Answer in English."}]},"contents":[{"role":"user","parts":[{"text":"Why?"}]}]}`,
			path:   "/v1beta/models/gemini-1.5-flash:streamGenerateContent?alt=sse",
			prompt: estPrompt("Answer in English.", "Why?"), completion: defaultCompletion, settled: fakeUsage, stream: true,
			want: `"candidatesTokenCount":30`,
		},
		{
			name:   "gemini stream json array",
			body:   `{"contents":[{"role":"user","parts":[{"text":"An array, please."}]}],"generationConfig":{"maxOutputTokens":300}}`,
			path:   "/v1beta/models/gemini-1.5-flash:streamGenerateContent",
			prompt: estPrompt("An array, please."), completion: 300, settled: fakeUsage, stream: true,
			want: `"candidatesTokenCount":30`,
		},
		{
			// Ollama streams unless told not to.
			name: "ollama chat stream",
			body: `{"model":"llama3","messages":[{"role":"user","content":"Why is the sky blue?"}],"options":{"num_predict":128}}`,
			path: "/api/chat", prompt: estPrompt("Why is the sky blue?"), completion: 128, settled: fakeUsage, stream: true,
			want: `"eval_count":30`,
		},
		{
			name: "ollama chat",
			body: `{"model":"llama3","stream":false,"messages":[{"role":"user","content":"Why is the grass green?"}]}`,
			path: "/api/chat", prompt: estPrompt("Why is the grass green?"), completion: defaultCompletion, settled: fakeUsage,
		},
		{
			name: "ollama generate stream",
			body: `{"model":"llama3","system":"Be short.","prompt":"Write a haiku."}`,
			path: "/api/generate", prompt: estPrompt("Be short.", "Write a haiku."), completion: defaultCompletion,
			settled: fakeUsage, stream: true, want: `"eval_count":30`,
		},
		{
			name: "ollama generate",
			body: `{"model":"llama3","stream":false,"prompt":"Write a limerick.","options":{"num_predict":64}}`,
			path: "/api/generate", prompt: estPrompt("Write a limerick."), completion: 64, settled: fakeUsage,
		},
	}
	if got := estPrompt("hello 你好"); got != 4 {
		t.Fatalf("estPrompt(hello 你好) = %d, want 2 + 2", got)
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			start := time.Now()
			runTokCase(t, h, up, c, delay)
			if time.Since(start) > tokInterval {
				t.Fatalf("the case took %s, longer than a token's refill: its figures are not exact", time.Since(start))
			}
		})
	}
}

// A stream without usage settles on the prompt estimate plus the text it
// carried; stream_usage makes the upstream report usage instead, by adding
// stream_options.include_usage to the body, and the settlement is exact.
func TestTokenStreamUsage(t *testing.T) {
	const delay = 30 * time.Millisecond
	up := startFake(t, fakellm.Config{PromptTokens: fakePrompt, CompletionTokens: fakeCompletion, ChunkDelay: delay})
	h := newHarness(t)

	const (
		chatStream = `{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"Count to three."}]}`
		compStream = `{"model":"gpt-3.5-turbo-instruct","stream":true,"prompt":"One, two,","max_tokens":20}`
		azStream   = `{"messages":[{"role":"user","content":"Azure, count."}],"stream":true,"max_tokens":40}`
		azPath     = "/openai/deployments/my-dep/chat/completions?api-version=2024-06-01"
	)
	usageChunk := `"choices":[],"created":` // the extra chunk, with the usage:
	usageObj := `"usage":{"completion_tokens":30,"prompt_tokens":20,"total_tokens":50}`

	// Two sites: stream_usage off on h, on on hOn, in separate zones.
	hOn := h.sibling(freePort(t))
	h.load(h.site(tokenBlock(""), hostPort(up)) +
		hOn.site(tokenBlock("\t\tzone on\n\t\ttokens {\n\t\t\tstream_usage\n\t\t}"), hostPort(up)))

	t.Run("off", func(t *testing.T) {
		for _, c := range []tokCase{
			{name: "chat", path: "/v1/chat/completions", body: chatStream, prompt: estPrompt("Count to three."),
				completion: defaultCompletion, settled: estPrompt("Count to three.") + fakeTextTokens, stream: true},
			{name: "completions", path: "/v1/completions", body: compStream, prompt: estPrompt("One, two,"),
				completion: 20, settled: estPrompt("One, two,") + fakeTextTokens, stream: true},
			{name: "azure", path: azPath, body: azStream, prompt: estPrompt("Azure, count."),
				completion: 40, settled: estPrompt("Azure, count.") + fakeTextTokens, stream: true},
		} {
			r := runTokCase(t, h, up, c, delay)
			if strings.Contains(string(r.body), `"usage"`) {
				t.Errorf("%s: the stream carries usage without stream_usage: %s", c.name, r.body)
			}
		}
	})

	t.Run("on", func(t *testing.T) {
		h := hOn
		for _, c := range []struct {
			tokCase
			// upstream is the body the upstream must receive.
			upstream string
		}{
			{tokCase{name: "chat on", path: "/v1/chat/completions", body: chatStream, prompt: estPrompt("Count to three."),
				completion: defaultCompletion, settled: fakeUsage, stream: true, want: usageChunk},
				`{"stream_options":{"include_usage":true},"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"Count to three."}]}`},
			{tokCase{name: "completions on", path: "/v1/completions", body: compStream, prompt: estPrompt("One, two,"),
				completion: 20, settled: fakeUsage, stream: true, want: usageChunk},
				`{"stream_options":{"include_usage":true},"model":"gpt-3.5-turbo-instruct","stream":true,"prompt":"One, two,","max_tokens":20}`},
			{tokCase{name: "azure on", path: azPath, body: azStream, prompt: estPrompt("Azure, count."),
				completion: 40, settled: fakeUsage, stream: true, want: usageChunk},
				`{"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Azure, count."}],"stream":true,"max_tokens":40}`},
			// The client chose: stream_options is left alone, even without
			// include_usage, and the text is counted.
			{tokCase{name: "client said no", path: "/v1/chat/completions",
				body:   `{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":false},"messages":[{"role":"user","content":"No usage."}]}`,
				prompt: estPrompt("No usage."), completion: defaultCompletion, settled: estPrompt("No usage.") + fakeTextTokens, stream: true}, ""},
			// Not a stream, or not a chat or completion stream: unchanged.
			{tokCase{name: "not streamed", path: "/v1/chat/completions",
				body:   `{"model":"gpt-4o","messages":[{"role":"user","content":"Plain."}]}`,
				prompt: estPrompt("Plain."), completion: defaultCompletion, settled: fakeUsage}, ""},
			{tokCase{name: "responses stream", path: "/v1/responses",
				body:   `{"model":"gpt-4o","stream":true,"input":"Responses."}`,
				prompt: estPrompt("Responses."), completion: defaultCompletion, settled: fakeUsage, stream: true}, ""},
			{tokCase{name: "anthropic stream", path: "/v1/messages",
				body:   `{"model":"claude","stream":true,"max_tokens":50,"messages":[{"role":"user","content":"Anthropic."}]}`,
				prompt: estPrompt("Anthropic."), completion: 50, settled: fakeUsage, stream: true}, ""},
		} {
			t.Run(c.name, func(t *testing.T) {
				before := len(up.Requests())
				hdr := []string{"X-Case", c.name}
				r := h.postTimed(t, c.path, c.body, hdr...)
				wantStatus(t, c.name, r.response, http.StatusOK)
				wantRemaining(t, c.name+" at admission", r.response, map[string]int64{tokPolicy: tokCap - c.prompt - c.completion})
				if c.stream {
					wantIncremental(t, c.name, r, delay)
				}
				if c.want != "" && (!strings.Contains(string(r.body), c.want) || !strings.Contains(string(r.body), usageObj)) {
					t.Errorf("%s: the client did not get the usage chunk: %s", c.name, r.body)
				}
				want := c.body
				if c.upstream != "" {
					want = c.upstream
				}
				got := requestsSince(up, before)
				if len(got) != 1 {
					t.Fatalf("upstream saw %d requests, want 1", len(got))
				}
				if got[0].BodySHA256 != sha([]byte(want)) || got[0].BodyLen != len(want) {
					t.Errorf("upstream body: %d bytes, sha256 %s; want %d bytes of %s", got[0].BodyLen, got[0].BodySHA256, len(want), want)
				}
				if cl := got[0].Header.Get("Content-Length"); cl != strconv.Itoa(len(want)) {
					t.Errorf("upstream Content-Length %q, want %d", cl, len(want))
				}
				if l := h.level(t, c.name); l != tokCap-c.settled {
					t.Errorf("after settlement r=%d, want %d (charged %d, want %d)", l, tokCap-c.settled, tokCap-l, c.settled)
				}
			})
		}
	})
}

// Without stream_usage a streaming OpenAI body reaches the upstream byte for
// byte, odd spacing, escapes, key order and all, sent with a length or
// chunked.
func TestTokenStreamBodyUnchanged(t *testing.T) {
	up := startFake(t, fakellm.Config{PromptTokens: fakePrompt, CompletionTokens: fakeCompletion})
	h := newHarness(t)
	h.loadHandler(tokenBlock(""), up)
	body := "{ \"stream\" : true ,\n\t\"messages\":[{\"content\":\"caf\\u00e9 \\\"quoted\\\" \u4e16\",\"role\":\"user\"}], \"model\":\"gpt-4o\" }\r\n"
	// café "quoted" 世: 14 runes, one of them CJK: ceil(13/4) + 1.
	prompt := estPrompt("café \"quoted\" 世")
	if prompt != 5 {
		t.Fatalf("prompt estimate %d, want 5", prompt)
	}
	for i, chunked := range []bool{false, true} {
		user := fmt.Sprintf("unchanged-%d", i)
		before := len(up.Requests())
		var r response
		if chunked {
			r = h.postChunked("/v1/chat/completions", []byte(body), "X-Case", user)
		} else {
			r = h.post("/v1/chat/completions", body, "X-Case", user)
		}
		wantStatus(t, user, r, http.StatusOK)
		wantRemaining(t, user, r, map[string]int64{tokPolicy: tokCap - prompt - defaultCompletion})
		got := requestsSince(up, before)
		if len(got) != 1 || got[0].BodySHA256 != sha([]byte(body)) || got[0].BodyLen != len(body) {
			t.Fatalf("%s: upstream did not get the body byte for byte: %+v", user, got)
		}
		if strings.Contains(string(r.body), `"usage"`) {
			t.Errorf("%s: usage in a stream that did not ask for it: %s", user, r.body)
		}
		if l := h.level(t, user); l != tokCap-prompt-fakeTextTokens {
			t.Errorf("%s: after settlement r=%d, want %d", user, l, tokCap-prompt-fakeTextTokens)
		}
	}
}

// A client that leaves mid-stream is charged what it was sent: the prompt
// estimate (or the usage reported so far, if more) plus the streamed text,
// and never less than the prompt estimate.
func TestTokenClientDisconnect(t *testing.T) {
	up := startFake(t, fakellm.Config{PromptTokens: fakePrompt, CompletionTokens: fakeCompletion, ChunkDelay: 30 * time.Second})
	h := newHarness(t)
	h.loadHandler(tokenBlock(""), up)

	// 120 characters: a prompt estimate of 30, above the 20 the upstream
	// reports, so that "never less than the prompt estimate" shows.
	long := strings.Repeat("Tell me more. ", 8) + "Please go on."
	long = long[:120]
	if estPrompt(long) != 30 {
		t.Fatalf("estPrompt(long) = %d", estPrompt(long))
	}
	for _, c := range []tokCase{
		{name: "openai chat", path: "/v1/chat/completions",
			body:   `{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"` + long + `"}]}`,
			prompt: 30, completion: defaultCompletion, settled: 30 + fake1Tokens},
		{name: "openai chat include_usage", path: "/v1/chat/completions",
			body:   `{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"max_tokens":500,"messages":[{"role":"user","content":"Short."}]}`,
			prompt: estPrompt("Short."), completion: 500, settled: estPrompt("Short.") + fake1Tokens},
		{name: "responses", path: "/v1/responses",
			body:   `{"model":"gpt-4o","stream":true,"input":"` + long + `"}`,
			prompt: 30, completion: defaultCompletion, settled: 30 + fake1Tokens},
		{name: "ollama chat", path: "/api/chat",
			body:   `{"model":"llama3","messages":[{"role":"user","content":"` + long + `"}]}`,
			prompt: 30, completion: defaultCompletion, settled: 30 + fake1Tokens},
		// message_start reported 20 input tokens (and a placeholder of 1
		// output token); the prompt estimate, 30, is larger, and "fake1" was
		// streamed: 30 + 2.
		{name: "anthropic", path: "/v1/messages",
			body:   `{"model":"claude-3-5-sonnet","stream":true,"max_tokens":300,"messages":[{"role":"user","content":"` + long + `"}]}`,
			prompt: 30, completion: 300, settled: 30 + fake1Tokens},
		// Gemini reports cumulative usage on every chunk: after the first,
		// 20 prompt + 10 completion, more than the prompt estimate.
		{name: "gemini", path: "/v1beta/models/gemini-1.5-flash:streamGenerateContent?alt=sse",
			body:   `{"contents":[{"role":"user","parts":[{"text":"Short."}]}]}`,
			prompt: estPrompt("Short."), completion: defaultCompletion, settled: fakePrompt + fakeCompletion/3},
	} {
		t.Run(c.name, func(t *testing.T) {
			start := time.Now()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			req := h.newReq(http.MethodPost, c.path, strings.NewReader(c.body), "X-Case", c.name)
			res, err := h.client.Do(req.WithContext(ctx))
			if err != nil {
				t.Fatal(err)
			}
			r := response{status: res.StatusCode, header: res.Header}
			wantStatus(t, c.name, r, http.StatusOK)
			admitted := tokCap - c.prompt - c.completion
			wantRemaining(t, c.name+" at admission", r, map[string]int64{tokPolicy: admitted})
			// Read up to the first chunk, then leave while the upstream
			// holds the second back for 30 s.
			var got []byte
			buf := make([]byte, 4096)
			for !bytes.Contains(got, []byte("fake1")) {
				n, err := res.Body.Read(buf)
				got = append(got, buf[:n]...)
				if err != nil {
					t.Fatalf("reading to the first chunk: %v (got %q)", err, got)
				}
			}
			cancel()
			res.Body.Close()

			// The upstream sees the proxy leave; the handler then returns
			// at once.
			wctx, wcancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer wcancel()
			if !waitFor(wctx, func() bool { return up.InFlight() == 0 }) {
				t.Fatalf("the upstream stream is still open 5 s after the client left")
			}
			l := h.waitLevelChange(t, c.name, admitted, 2*time.Second)
			charged := tokCap - l
			if charged < c.prompt {
				t.Errorf("charged %d, less than the prompt estimate %d", charged, c.prompt)
			}
			if charged != c.settled {
				t.Errorf("charged %d after the client left, want %d (estimate %d)", charged, c.settled, c.prompt+c.completion)
			}
			if time.Since(start) > tokInterval {
				t.Fatalf("the case took %s, longer than a token's refill", time.Since(start))
			}
		})
	}
}

// An upstream that refuses (its own 429) or cannot be reached (502)
// generated nothing: the completion estimate is refunded and the prompt
// estimate stays charged.
func TestTokenUpstreamError(t *testing.T) {
	fixed := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	// One request, and never another: the upstream's clock stands still.
	up := startFake(t, fakellm.Config{RPM: 1, Burst: 1, PromptTokens: fakePrompt, CompletionTokens: fakeCompletion,
		Now: func() time.Time { return fixed }})
	h := newHarness(t)

	// Two sites: one in front of the fake upstream, one in front of a port
	// nothing listens on.
	hDown := h.sibling(freePort(t))
	dead := freePort(t)
	h.load(h.site(tokenBlock(""), hostPort(up)) +
		hDown.site(tokenBlock("\t\tzone down"), fmt.Sprintf("127.0.0.1:%d", dead)))

	t.Run("upstream 429", func(t *testing.T) {
		chat := `{"model":"gpt-4o","messages":[{"role":"user","content":"First and second."}]}`
		p := estPrompt("First and second.")
		r := h.post("/v1/chat/completions", chat, "X-Case", "oa")
		wantStatus(t, "first", r, http.StatusOK)
		wantRemaining(t, "first", r, map[string]int64{tokPolicy: tokCap - p - defaultCompletion})
		if l := h.level(t, "oa"); l != tokCap-fakeUsage {
			t.Fatalf("after the first: r=%d, want %d", l, tokCap-fakeUsage)
		}
		r = h.post("/v1/chat/completions", chat, "X-Case", "oa")
		wantStatus(t, "second", r, http.StatusTooManyRequests)
		var e openAIError
		decodeStrict(t, "upstream 429", r.body, &e)
		if e.Error.Code != "rate_limit_exceeded" || strings.Contains(e.Error.Message, "rule ") {
			t.Errorf("the upstream's 429 did not pass through: %s", r.body)
		}
		wantRemaining(t, "second", r, map[string]int64{tokPolicy: tokCap - fakeUsage - p - defaultCompletion})
		if l := h.level(t, "oa"); l != tokCap-fakeUsage-p {
			t.Errorf("after the upstream's 429: r=%d, want %d (the prompt estimate %d charged, the completion refunded)",
				l, tokCap-fakeUsage-p, p)
		}

		for _, c := range []struct {
			user, path, body string
			prompt           int64
		}{
			{"an", "/v1/messages", `{"model":"claude","max_tokens":700,"stream":true,"messages":[{"role":"user","content":"Refused anthropic."}]}`,
				estPrompt("Refused anthropic.")},
			{"oa-stream", "/v1/chat/completions", `{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Refused stream."}]}`,
				estPrompt("Refused stream.")},
			{"ge", "/v1beta/models/gemini-1.5-flash:streamGenerateContent?alt=sse", `{"contents":[{"parts":[{"text":"Refused gemini."}]}]}`,
				estPrompt("Refused gemini.")},
			{"ol", "/api/chat", `{"model":"llama3","messages":[{"role":"user","content":"Refused ollama."}]}`,
				estPrompt("Refused ollama.")},
		} {
			r := h.post(c.path, c.body, "X-Case", c.user)
			wantStatus(t, c.user, r, http.StatusTooManyRequests)
			if l := h.level(t, c.user); l != tokCap-c.prompt {
				t.Errorf("%s after the upstream's 429: r=%d, want %d (prompt estimate %d)", c.user, l, tokCap-c.prompt, c.prompt)
			}
		}
		if total, limited := up.Counts(); limited != 5 || total < 6 {
			t.Errorf("upstream: %d requests, %d refused; want 5 refused", total, limited)
		}
	})

	t.Run("upstream down", func(t *testing.T) {
		h := hDown
		for _, c := range []struct {
			user, path, body string
			prompt           int64
		}{
			{"down", "/v1/chat/completions", `{"model":"gpt-4o","messages":[{"role":"user","content":"Anyone there?"}]}`, estPrompt("Anyone there?")},
			{"down-stream", "/v1/chat/completions", `{"model":"gpt-4o","stream":true,"max_tokens":99,"messages":[{"role":"user","content":"Hello?"}]}`, estPrompt("Hello?")},
			{"down-gemini", "/v1beta/models/g:generateContent", `{"contents":[{"parts":[{"text":"Echo?"}]}]}`, estPrompt("Echo?")},
		} {
			r := h.post(c.path, c.body, "X-Case", c.user)
			wantStatus(t, c.user, r, http.StatusBadGateway)
			// The probe goes to the dead upstream too: Caddy's 502 still
			// carries the headers.
			pr := h.post("/v1/models", "", "X-Case", c.user)
			wantStatus(t, c.user+" probe", pr, http.StatusBadGateway)
			if l := remaining(t, pr, tokPolicy); l != tokCap-c.prompt {
				t.Errorf("%s with the upstream down: r=%d, want %d (prompt estimate %d)", c.user, l, tokCap-c.prompt, c.prompt)
			}
		}
	})
}

// Admission is atomic across request and token buckets: a request refused by
// a request limit charges no tokens, and one refused by a token limit
// charges no request.
func TestTokenAtomicWithRequestLimits(t *testing.T) {
	up := startFake(t, fakellm.Config{PromptTokens: fakePrompt, CompletionTokens: fakeCompletion})
	h := newHarness(t)
	h.loadHandler(`
		user {http.request.header.X-Case}
		rule req {
			when {
				models gpt-4o
			}
			limit 2 requests_per_day
			applies_per user
		}
		rule tok {
			limit 2000 tokens_per_day
			applies_per user
		}`, up)
	const (
		rq = "req/requests_per_day"
		tk = "tok/tokens_per_day"
	)
	body := func(maxTokens int) string {
		return fmt.Sprintf(`{"model":"gpt-4o","max_tokens":%d,"messages":[{"role":"user","content":"Atomic?"}]}`, maxTokens)
	}
	p := estPrompt("Atomic?")

	t.Run("refused by the request limit", func(t *testing.T) {
		before := len(up.Requests())
		hdr := []string{"X-Case", "a"}
		r := h.post("/v1/chat/completions", body(100), hdr...)
		wantStatus(t, "a #1", r, http.StatusOK)
		wantRemaining(t, "a #1", r, map[string]int64{rq: 1, tk: 2000 - p - 100})
		r = h.post("/v1/chat/completions", body(100), hdr...)
		wantStatus(t, "a #2", r, http.StatusOK)
		wantRemaining(t, "a #2", r, map[string]int64{rq: 0, tk: 2000 - fakeUsage - p - 100})
		r = h.post("/v1/chat/completions", body(100), hdr...)
		wantOpenAI429(t, "a #3", r, "req", "requests_per_day")
		// Both earlier requests settled at 50; the refused one charged
		// nothing.
		wantRemaining(t, "a #3", r, map[string]int64{rq: 0, tk: 2000 - 2*fakeUsage})
		pr := h.post("/v1/models", "", hdr...)
		wantRemaining(t, "a probe", pr, map[string]int64{tk: 2000 - 2*fakeUsage})
		if n := len(requestsSince(up, before)); n != 3 {
			t.Errorf("upstream saw %d requests, want 2 and the probe", n)
		}
	})

	t.Run("refused by the token limit", func(t *testing.T) {
		hdr := []string{"X-Case", "b"}
		start := time.Now()
		r := h.post("/v1/chat/completions", body(1990-int(p)), hdr...)
		wantStatus(t, "b #1", r, http.StatusOK)
		wantRemaining(t, "b #1", r, map[string]int64{rq: 1, tk: 10})
		// Settled to 50: 1950 left, and this asks for 1960 + the prompt.
		r = h.post("/v1/chat/completions", body(1960), hdr...)
		elapsed := time.Since(start)
		wantStatus(t, "b #2", r, http.StatusTooManyRequests)
		var e openAIError
		decodeStrict(t, "b #2", r.body, &e)
		if e.Error.Type != "tokens" || e.Error.Code != "rate_limit_exceeded" {
			t.Errorf("b #2: type %q code %q, want tokens, rate_limit_exceeded", e.Error.Type, e.Error.Code)
		}
		wantRuleMessage(t, "b #2", e.Error.Message, "tok", "tokens_per_day")
		wantRemaining(t, "b #2", r, map[string]int64{rq: 1, tk: 2000 - fakeUsage})
		// It fits once p + 1960 - 1950 tokens have refilled, 43.2 s each.
		_, ms := wantRetryAfter(t, "b #2", r)
		wantMs := (p + 1960 - 1950) * 43200
		if ms > wantMs || ms < wantMs-elapsed.Milliseconds()-1 {
			t.Errorf("b #2: Retry-After-Ms %d, want %d less at most the %s elapsed", ms, wantMs, elapsed)
		}
		r = h.post("/v1/chat/completions", body(10), hdr...)
		wantStatus(t, "b #3", r, http.StatusOK)
		wantRemaining(t, "b #3", r, map[string]int64{rq: 0, tk: 2000 - fakeUsage - p - 10})
	})
}

// A request larger than a bucket's capacity: 413 in its dialect with
// oversize reject; admitted on a full bucket by default, leaving a debt that
// the next request waits out.
func TestTokenOversize(t *testing.T) {
	t.Run("reject", func(t *testing.T) {
		up := startFake(t, fakellm.Config{PromptTokens: fakePrompt, CompletionTokens: fakeCompletion})
		h := newHarness(t)
		h.loadHandler(`
		user {http.request.header.X-Case}
		tokens {
			oversize reject
		}
		rule small {
			limit 1000 tokens_per_day
			applies_per user
		}`, up)
		const pol = "small/tokens_per_day"
		for _, c := range []struct {
			name, path, body string
			estimate         int64
			check            func(t *testing.T, r response) string
		}{
			{"openai", "/v1/chat/completions", `{"model":"gpt-4o","messages":[{"role":"user","content":"No maximum."}]}`,
				estPrompt("No maximum.") + defaultCompletion, func(t *testing.T, r response) string {
					var e openAIError
					decodeStrict(t, "openai 413", r.body, &e)
					if e.Error.Code != "request_too_large" || e.Error.Type != "invalid_request_error" {
						t.Errorf("openai 413: %s", r.body)
					}
					return e.Error.Message
				}},
			{"openai n", "/v1/chat/completions", `{"model":"gpt-4o","max_tokens":400,"n":3,"messages":[{"role":"user","content":"Three."}]}`,
				estPrompt("Three.") + 1200, func(t *testing.T, r response) string {
					var e openAIError
					decodeStrict(t, "openai 413", r.body, &e)
					return e.Error.Message
				}},
			{"anthropic", "/v1/messages", `{"model":"claude","max_tokens":2000,"messages":[{"role":"user","content":"Big."}]}`,
				estPrompt("Big.") + 2000, func(t *testing.T, r response) string {
					var e struct {
						Type  string `json:"type"`
						Error struct{ Type, Message string }
					}
					decodeStrict(t, "anthropic 413", r.body, &e)
					if e.Type != "error" || e.Error.Type != "request_too_large" {
						t.Errorf("anthropic 413: %s", r.body)
					}
					return e.Error.Message
				}},
			{"gemini", "/v1beta/models/gemini-1.5-flash:generateContent", `{"contents":[{"parts":[{"text":"Big."}]}],"generationConfig":{"maxOutputTokens":5000}}`,
				estPrompt("Big.") + 5000, func(t *testing.T, r response) string { return geminiMessage(t, r, 413, "INVALID_ARGUMENT") }},
			{"ollama", "/api/generate", `{"model":"llama3","prompt":"Big.","options":{"num_predict":3000}}`,
				estPrompt("Big.") + 3000, ollamaMessage},
		} {
			t.Run(c.name, func(t *testing.T) {
				before := len(up.Requests())
				r := h.post(c.path, c.body, "X-Case", c.name)
				wantStatus(t, c.name, r, http.StatusRequestEntityTooLarge)
				msg := c.check(t, r)
				want := fmt.Sprintf(`it needs about %d tokens, and rule "small" allows at most 1000 at once (1000 tokens_per_day)`, c.estimate)
				if !strings.Contains(msg, want) {
					t.Errorf("message %q does not say %q", msg, want)
				}
				if n := len(requestsSince(up, before)); n != 0 {
					t.Errorf("upstream saw %d requests", n)
				}
				pr := h.post("/v1/models", "", "X-Case", c.name)
				wantRemaining(t, c.name+" probe", pr, map[string]int64{pol: 1000})
			})
		}
		// What fits passes.
		r := h.post("/v1/chat/completions", `{"model":"gpt-4o","max_tokens":900,"messages":[{"role":"user","content":"Fits."}]}`, "X-Case", "fits")
		wantStatus(t, "fits", r, http.StatusOK)
		wantRemaining(t, "fits", r, map[string]int64{pol: 1000 - estPrompt("Fits.") - 900})
	})

	t.Run("admit", func(t *testing.T) {
		// The upstream reports more than the bucket holds: 20 + 1500.
		up := startFake(t, fakellm.Config{PromptTokens: fakePrompt, CompletionTokens: 1500})
		h := newHarness(t)
		h.loadHandler(`
		rule small {
			limit 1000 tokens_per_day
		}`, up)
		const pol = "small/tokens_per_day"
		start := time.Now()
		r := h.post("/v1/chat/completions", `{"model":"gpt-4o","messages":[{"role":"user","content":"Huge."}]}`)
		wantStatus(t, "oversize", r, http.StatusOK)
		wantRemaining(t, "oversize", r, map[string]int64{pol: 0})
		// Settled at 1520 on a bucket of 1000: 520 in debt. The next
		// request, 1 + 10, fits after 531 tokens have refilled, 86.4 s each.
		next := `{"model":"gpt-4o","max_tokens":10,"messages":[{"role":"user","content":"Hi"}]}`
		r = h.post("/v1/chat/completions", next)
		elapsed := time.Since(start)
		wantStatus(t, "after the debt", r, http.StatusTooManyRequests)
		var e openAIError
		decodeStrict(t, "after the debt", r.body, &e)
		if e.Error.Type != "tokens" {
			t.Errorf("after the debt: type %q, want tokens", e.Error.Type)
		}
		wantRuleMessage(t, "after the debt", e.Error.Message, "small", "tokens_per_day")
		wantRemaining(t, "after the debt", r, map[string]int64{pol: 0})
		secs, ms := wantRetryAfter(t, "after the debt", r)
		wantMs := (1520 - 1000 + estPrompt("Hi") + 10) * 86400
		if ms > wantMs || ms < wantMs-elapsed.Milliseconds()-1 {
			t.Errorf("Retry-After-Ms %d (Retry-After %d), want %d less at most the %s elapsed", ms, secs, wantMs, elapsed)
		}
		if total, _ := up.Counts(); total != 1 {
			t.Errorf("upstream saw %d requests, want 1", total)
		}
	})
}

// scrape reads Prometheus text from url into a map from series (name and
// labels, as written) to value.
func scrape(t *testing.T, h *harness, url string) map[string]float64 {
	t.Helper()
	r := h.do(h.newReqURL(http.MethodGet, url, nil))
	wantStatus(t, "metrics", r, http.StatusOK)
	out := map[string]float64{}
	for _, line := range strings.Split(string(r.body), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			t.Fatalf("metrics line %q", line)
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	return out
}

// The estimate ratio histogram counts one observation, real / estimate, per
// settled request whose upstream reported usage, labelled by dialect.
func TestTokenEstimateRatioMetric(t *testing.T) {
	up := startFake(t, fakellm.Config{PromptTokens: fakePrompt, CompletionTokens: fakeCompletion})
	h := newHarness(t)
	metricsPort := freePort(t)
	h.load(h.site(tokenBlock(""), hostPort(up)) + fmt.Sprintf(":%d {\n\tmetrics\n}\n", metricsPort))

	type sent struct {
		path, body string
		status     int
		// dialect is the label of the observation, "" for none; estimate
		// and real give its value.
		dialect        string
		estimate, real int64
	}
	var reqs = []sent{
		{"/v1/chat/completions", `{"model":"gpt-4o","messages":[{"role":"user","content":"One."}]}`, 200,
			"openai", estPrompt("One.") + defaultCompletion, fakeUsage},
		{"/v1/chat/completions", `{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"max_tokens":50,"messages":[{"role":"user","content":"Two."}]}`, 200,
			"openai", estPrompt("Two.") + 50, fakeUsage},
		{"/v1/embeddings", `{"model":"e","input":"Three."}`, 200, "openai", estPrompt("Three."), fakePrompt},
		{"/v1/responses", `{"model":"gpt-4o","input":"Four.","max_output_tokens":45}`, 200, "openai", estPrompt("Four.") + 45, fakeUsage},
		// No usage reported: settled on the text, not observed.
		{"/v1/chat/completions", `{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"Five."}]}`, 200, "", 0, 0},
		// The upstream knows no such path (404): nothing generated, not
		// observed.
		{"/llm/chat/completions", `{"model":"gpt-4o","messages":[{"role":"user","content":"Six."}]}`, 404, "", 0, 0},
		// A request that charges nothing.
		{"/v1/models", ``, 404, "", 0, 0},
		{"/v1/messages", `{"model":"claude","max_tokens":60,"messages":[{"role":"user","content":"Seven."}]}`, 200,
			"anthropic", estPrompt("Seven.") + 60, fakeUsage},
		{"/openai/deployments/d/chat/completions", `{"messages":[{"role":"user","content":"Eight."}],"max_tokens":70}`, 200,
			"azure", estPrompt("Eight.") + 70, fakeUsage},
		{"/v1beta/models/g:streamGenerateContent?alt=sse", `{"contents":[{"parts":[{"text":"Nine."}]}],"generationConfig":{"maxOutputTokens":20}}`, 200,
			"gemini", estPrompt("Nine.") + 20, fakeUsage},
		{"/api/generate", `{"model":"llama3","prompt":"Ten.","options":{"num_predict":25}}`, 200,
			"ollama", estPrompt("Ten.") + 25, fakeUsage},
	}
	// The collectors live as long as the process: compare with where they
	// stood before this test's requests.
	before := scrape(t, h, fmt.Sprintf("http://127.0.0.1:%d/metrics", metricsPort))
	count := map[string]int{}
	sum := map[string]float64{}
	for i, s := range reqs {
		r := h.post(s.path, s.body, "X-Case", fmt.Sprintf("m%d", i))
		wantStatus(t, s.path, r, s.status)
		if s.dialect != "" {
			count[s.dialect]++
			sum[s.dialect] += float64(s.real) / float64(s.estimate)
		}
	}
	m := scrape(t, h, fmt.Sprintf("http://127.0.0.1:%d/metrics", metricsPort))
	const name = "caddy_llm_rate_limit_token_estimate_ratio"
	for series, v := range m {
		m[series] = v - before[series]
	}
	seen := 0
	for series, v := range m {
		if strings.HasPrefix(series, name+"_count{") && v > 0 {
			seen++
		}
	}
	if seen != len(count) {
		t.Errorf("%d dialects observed, want %d (%v)", seen, len(count), count)
	}
	for d, n := range count {
		labels := fmt.Sprintf(`{dialect=%q}`, d)
		if got, ok := m[name+"_count"+labels]; !ok || got != float64(n) { // growth since before
			t.Errorf("%s_count%s = %v (present %v), want %d", name, labels, got, ok, n)
		}
		if got := m[name+"_sum"+labels]; math.Abs(got-sum[d]) > 1e-4 { // a difference of two large float sums
			t.Errorf("%s_sum%s = %v, want %v", name, labels, got, sum[d])
		}
		if got := m[name+"_bucket"+fmt.Sprintf(`{dialect=%q,le="+Inf"}`, d)]; got != float64(n) {
			t.Errorf("%s_bucket%s +Inf = %v, want %d", name, labels, got, n)
		}
	}
}
