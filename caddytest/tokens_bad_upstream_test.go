package caddytest

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Token settlement through a real Caddy in front of upstreams that misbehave:
// streams cut short, malformed events, nonsense usage, huge usage, errors and
// compression. Each test checks that nothing broke (Caddy answers the next
// request, the level probe), that the charge after settlement is exactly
// what the settlement rules give, and what the client received.

// buReceived is one request a bad upstream received.
type buReceived struct {
	path   string
	header http.Header
	body   []byte
}

// buUpstream is a misbehaving upstream on loopback. It answers the level
// probe (/v1/models) with a 404, and hands everything else to its handler.
type buUpstream struct {
	srv *httptest.Server
	mu  sync.Mutex
	got []buReceived
}

func startBadUpstream(t *testing.T, handle func(w http.ResponseWriter, r *http.Request, body []byte)) *buUpstream {
	t.Helper()
	u := &buUpstream{}
	u.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			t.Errorf("upstream: reading the request body: %v", err)
			return
		}
		if r.URL.Path == "/v1/models" {
			http.NotFound(w, r)
			return
		}
		u.mu.Lock()
		u.got = append(u.got, buReceived{path: r.URL.Path, header: r.Header.Clone(), body: body})
		u.mu.Unlock()
		handle(w, r, body)
	}))
	t.Cleanup(u.srv.Close)
	return u
}

func (u *buUpstream) hostPort() string { return strings.TrimPrefix(u.srv.URL, "http://") }

func (u *buUpstream) received() []buReceived {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]buReceived(nil), u.got...)
}

// buLoad loads the token handler block in front of u. proxyOpts, when not
// empty, is the body of a reverse_proxy block.
func buLoad(h *harness, u *buUpstream, proxyOpts string) {
	h.t.Helper()
	up := u.hostPort()
	if proxyOpts != "" {
		up += " {\n" + proxyOpts + "\n\t}"
	}
	h.load(h.site(tokenBlock(""), up))
}

// buResult is a response read to its end, however the end came.
type buResult struct {
	response
	// readErr is what ended the body: nil for a clean end.
	readErr error
}

// buSend sends a POST and reads the response until it ends, cleanly or not,
// within a bounded time.
func buSend(t *testing.T, h *harness, path, body string, hdr ...string) buResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req := h.newReq(http.MethodPost, path, strings.NewReader(body), hdr...).WithContext(ctx)
	res, err := h.client.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	defer res.Body.Close()
	b, rerr := io.ReadAll(res.Body)
	if ctx.Err() != nil {
		t.Fatalf("POST %s: the response did not end within the deadline (read %d bytes): %v", path, len(b), rerr)
	}
	return buResult{response{status: res.StatusCode, header: res.Header, body: b}, rerr}
}

// wantCutShort checks that a response the upstream cut short reached the
// client as far as it went, and that its end shows the truncation: Caddy
// aborts the chunked response (no terminating chunk) rather than passing it
// off as complete, and never hangs.
func wantCutShort(t *testing.T, what string, r buResult, status int, parts ...string) {
	t.Helper()
	wantStatus(t, what, r.response, status)
	for _, p := range parts {
		if !bytes.Contains(r.body, []byte(p)) {
			t.Errorf("%s: the client did not receive %q; got %q", what, p, truncate(string(r.body), 500))
		}
	}
	if !errors.Is(r.readErr, io.ErrUnexpectedEOF) {
		t.Errorf("%s: the body ended with %v, want io.ErrUnexpectedEOF (a truncated chunked stream)", what, r.readErr)
	}
}

// buHijack takes the connection over, to write a response by hand.
func buHijack(t *testing.T, w http.ResponseWriter) (net.Conn, *bufio.ReadWriter) {
	t.Helper()
	conn, rw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		t.Errorf("upstream: hijack: %v", err)
		return nil, nil
	}
	return conn, rw
}

// buChunk writes one HTTP/1.1 chunk and flushes it.
func buChunk(rw *bufio.ReadWriter, s string) {
	fmt.Fprintf(rw, "%x\r\n%s\r\n", len(s), s)
	_ = rw.Flush()
}

// buCutStream answers with a chunked response of the given status and type,
// writes events as chunks, and closes the connection without the
// terminating chunk.
func buCutStream(t *testing.T, w http.ResponseWriter, status int, contentType string, events ...string) {
	conn, rw := buHijack(t, w)
	if conn == nil {
		return
	}
	defer conn.Close()
	fmt.Fprintf(rw, "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n",
		status, http.StatusText(status), contentType)
	for _, e := range events {
		buChunk(rw, e)
	}
}

// 1. An OpenAI stream that the upstream cuts after two content chunks: no
// [DONE], no usage. Settled as a response cut short: the prompt estimate
// plus the estimate of the text streamed.
func TestBadUpstreamTruncatedOpenAIStream(t *testing.T) {
	chunks := []string{"Once upon a time", ", a keeper watched the sea"}
	up := startBadUpstream(t, func(w http.ResponseWriter, r *http.Request, body []byte) {
		var events []string
		for i, c := range chunks {
			events = append(events, fmt.Sprintf(`data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{"role":"assistant","content":%q},"finish_reason":null}]}`+"\n\n", c))
			if i == 0 {
				// A keep-alive comment between the two.
				events = append(events, ": keep-alive\n\n")
			}
		}
		buCutStream(t, w, http.StatusOK, "text/event-stream", events...)
	})
	h := newHarness(t)
	buLoad(h, up, "")

	// Odd spacing, member order and non-ASCII text: the body must reach the
	// upstream exactly as sent.
	content := "Tell me a story about a lighthouse, s'il vous plaît — ünïcödé."
	body := "{ \"messages\" : [ {\"content\":\"" + content + "\", \"role\":\"user\"} ],\n\t\"stream\":true, \"max_tokens\": 200, \"model\":\"gpt-4o\" }\n"
	p := estPrompt(content)
	text := estPrompt(chunks...)
	if text < 2 {
		t.Fatalf("text estimate %d: want a streamed text worth several tokens", text)
	}

	r := buSend(t, h, "/v1/chat/completions", body, "X-Case", "cut-openai")
	wantRemaining(t, "at admission", r.response, map[string]int64{tokPolicy: tokCap - p - 200})
	wantCutShort(t, "truncated stream", r, http.StatusOK, chunks...)
	if bytes.Contains(r.body, []byte("[DONE]")) {
		t.Errorf("the client received a [DONE] the upstream never sent")
	}

	// Settled on the cut path: max(InputTokens 0, prompt estimate) +
	// max(OutputTokens 0, text estimate).
	if l := h.level(t, "cut-openai"); l != tokCap-p-text {
		t.Errorf("after the truncated stream: r=%d, want %d (prompt estimate %d + streamed text %d)", l, tokCap-p-text, p, text)
	}

	got := up.received()
	if len(got) != 1 {
		t.Fatalf("upstream received %d requests, want 1", len(got))
	}
	if sha(got[0].body) != sha([]byte(body)) {
		t.Errorf("the upstream received a different body:\n got %q\nwant %q", got[0].body, body)
	}

	// Caddy still serves: a second stream, cut the same way, is charged the
	// same on another bucket.
	r = buSend(t, h, "/v1/chat/completions", body, "X-Case", "cut-openai-2")
	wantCutShort(t, "second truncated stream", r, http.StatusOK, chunks...)
	if l := h.level(t, "cut-openai-2"); l != tokCap-p-text {
		t.Errorf("after the second truncated stream: r=%d, want %d", l, tokCap-p-text)
	}
}

// 2. An Anthropic stream cut after message_start (input_tokens 40 and the
// placeholder output_tokens 1) and one text_delta: the larger of the usage
// read and the estimates, on each side.
func TestBadUpstreamTruncatedAnthropicStream(t *testing.T) {
	const reportedInput = 40
	up := startBadUpstream(t, func(w http.ResponseWriter, r *http.Request, body []byte) {
		text := r.Header.Get("X-Text")
		buCutStream(t, w, http.StatusOK, "text/event-stream",
			"event: message_start\ndata: "+fmt.Sprintf(`{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-3-5-sonnet","content":[],"stop_reason":null,"usage":{"input_tokens":%d,"output_tokens":1}}}`, reportedInput)+"\n\n",
			"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
			"event: ping\ndata: {\"type\":\"ping\"}\n\n",
			"event: content_block_delta\ndata: "+fmt.Sprintf(`{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":%q}}`, text)+"\n\n",
		)
	})
	h := newHarness(t)
	buLoad(h, up, "")

	long := strings.Repeat("Please describe the tides. ", 8) // 216 characters: 54 tokens
	for _, c := range []struct {
		name, prompt, text string
	}{
		// The reported 40 beats the prompt estimate; the text beats the
		// placeholder.
		{"reported input, streamed text", "Hi there.", "Hello, this is a partial answer"},
		// The prompt estimate beats the reported 40; the placeholder and
		// a one-token text tie.
		{"prompt estimate, placeholder", long, "Ok"},
	} {
		t.Run(c.name, func(t *testing.T) {
			p, text := estPrompt(c.prompt), estPrompt(c.text)
			want := max(reportedInput, p) + max(1, text)
			body := fmt.Sprintf(`{"model":"claude-3-5-sonnet","stream":true,"max_tokens":300,"messages":[{"role":"user","content":%q}]}`, c.prompt)
			r := buSend(t, h, "/v1/messages", body, "X-Case", c.name, "X-Text", c.text)
			wantRemaining(t, "at admission", r.response, map[string]int64{tokPolicy: tokCap - p - 300})
			wantCutShort(t, "truncated anthropic stream", r, http.StatusOK, "message_start", c.text)
			if l := h.level(t, c.name); l != tokCap-want {
				t.Errorf("after the truncated stream: r=%d, want %d (max(%d, prompt estimate %d) + max(1, text %d))",
					l, tokCap-want, reportedInput, p, text)
			}
		})
	}
}

// 3. A stream full of junk: garbage lines, a non-JSON event, an unterminated
// JSON event, a 300 KB data line, CRLF line endings split across writes,
// then a valid final usage chunk and [DONE]. The usage wins: 7 + 3.
func TestBadUpstreamMalformedSSE(t *testing.T) {
	big := strings.Repeat("x", 150<<10) + `not "usage":{"prompt_tokens":999,"completion_tokens":999} at all` + strings.Repeat("y", 150<<10)
	bigChunk := `{"id":"c","choices":[{"index":0,"delta":{"content":` + strconv.Quote(big) + `}}],"usage":null}`
	if len(bigChunk) < 300<<10 {
		t.Fatalf("big chunk is %d bytes", len(bigChunk))
	}
	// Pieces are flushed one by one; some split a CRLF, or a JSON value.
	pieces := []string{
		": a comment\r\n",
		"garbage line without a colon\r\n",
		"\r\n",
		"%%%% ::: ####\r\n\r\n",
		"event: weird\r\ndata: this is not JSON {\r\n\r\n",
		"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ok\"}}],\"usage\":null}\r", "\n\r\n",
		"data: {\"unterminated\": \"str\r\n\r\n",
		"DATA: {\"usage\":{\"prompt_tokens\":5000,\"completion_tokens\":5000}}\r\n\r\n",
		"data: " + bigChunk[:100<<10], bigChunk[100<<10:] + "\r\n\r\n",
		"data: {\"choices\":[{\"delta\":\r\ndata: {\"content\":\"multi\"}}]}\r\n\r\n",
		"data: [1,2,3]\r\n\r\n",
		"data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,", "\"completion_tokens\":3}}\r\n\r\n",
		"data: [DONE]\r\n\r\n",
	}
	sent := strings.Join(pieces, "")
	up := startBadUpstream(t, func(w http.ResponseWriter, r *http.Request, body []byte) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(http.StatusOK)
		rc := http.NewResponseController(w)
		for _, s := range pieces {
			if _, err := io.WriteString(w, s); err != nil {
				return
			}
			_ = rc.Flush()
			time.Sleep(time.Millisecond)
		}
	})
	h := newHarness(t)
	buLoad(h, up, "")

	body := `{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"max_tokens":50,"messages":[{"role":"user","content":"Junk, please."}]}`
	p := estPrompt("Junk, please.")
	r := buSend(t, h, "/v1/chat/completions", body, "X-Case", "junk")
	wantStatus(t, "malformed stream", r.response, http.StatusOK)
	if r.readErr != nil {
		t.Errorf("malformed stream: the body ended with %v, want a clean end", r.readErr)
	}
	wantRemaining(t, "at admission", r.response, map[string]int64{tokPolicy: tokCap - p - 50})
	if sha(r.body) != sha([]byte(sent)) {
		t.Errorf("the client received %d bytes, not the %d the upstream sent (or not the same ones)", len(r.body), len(sent))
	}
	if l := h.level(t, "junk"); l != tokCap-10 {
		t.Errorf("after the malformed stream: r=%d, want %d (the final usage, 7 + 3)", l, tokCap-10)
	}
}

// 4. A non-streamed response whose usage is there but unusable: nothing is
// read, and the estimate stands.
func TestBadUpstreamWrongTypedUsage(t *testing.T) {
	usages := []string{
		`{"prompt_tokens":"many","completion_tokens":-5}`,
		`{"prompt_tokens":2.5,"completion_tokens":null,"total_tokens":true}`,
		`{"prompt_tokens":{"n":7},"completion_tokens":[3],"total_tokens":"10"}`,
		`"lots"`,
		`[7,3]`,
	}
	up := startBadUpstream(t, func(w http.ResponseWriter, r *http.Request, body []byte) {
		i, _ := strconv.Atoi(r.Header.Get("X-Usage"))
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there."},"finish_reason":"stop"}],"usage":`+usages[i]+`}`)
	})
	h := newHarness(t)
	buLoad(h, up, "")

	body := `{"model":"gpt-4o","max_tokens":120,"messages":[{"role":"user","content":"Count badly."}]}`
	est := estPrompt("Count badly.") + 120
	for i, u := range usages {
		user := fmt.Sprintf("badusage-%d", i)
		r := buSend(t, h, "/v1/chat/completions", body, "X-Case", user, "X-Usage", strconv.Itoa(i))
		wantStatus(t, u, r.response, http.StatusOK)
		if r.readErr != nil {
			t.Errorf("%s: the body ended with %v", u, r.readErr)
		}
		if !bytes.Contains(r.body, []byte(`"usage":`+u+`}`)) {
			t.Errorf("%s: the client did not receive the upstream's body: %s", u, truncate(string(r.body), 300))
		}
		wantRemaining(t, u+" at admission", r.response, map[string]int64{tokPolicy: tokCap - est})
		if l := h.level(t, user); l != tokCap-est {
			t.Errorf("usage %s: r=%d, want %d (no usage read: the estimate %d stands)", u, l, tokCap-est, est)
		}
	}
}

// 5. Absurd usage: clamped at 10^12 per figure, the bucket deep in debt,
// nothing broken, and the next request refused with a finite Retry-After.
func TestBadUpstreamHugeUsage(t *testing.T) {
	// 10^12 tokens at 10000 a day take 8.64 × 10^12 s to drain: no honest
	// Retry-After exceeds that. The store may saturate the debt, but it
	// must not forgive it: anything under 10^9 s (31 years) would.
	const maxSecs, minSecs = 864 * 10_000_000_000, 1_000_000_000
	var (
		arrivedMu sync.Mutex
		arrived   int
		allIn     = make(chan struct{})
	)
	const concurrent = 4
	up := startBadUpstream(t, func(w http.ResponseWriter, r *http.Request, body []byte) {
		switch r.Header.Get("X-Mode") {
		case "json":
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, `{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Big."}}],"usage":{"prompt_tokens":1e15,"completion_tokens":5,"total_tokens":1000000000000005}}`)
		case "stream":
			w.Header().Set("Content-Type", "text/event-stream")
			io.WriteString(w, "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Big.\"}}],\"usage\":null}\n\n")
			io.WriteString(w, "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1000000000000000,\"completion_tokens\":123456789012345678901234567890}}\n\n")
			io.WriteString(w, "data: [DONE]\n\n")
		case "barrier":
			// Hold every request until all of them have been admitted.
			arrivedMu.Lock()
			arrived++
			if arrived == concurrent {
				close(allIn)
			}
			arrivedMu.Unlock()
			select {
			case <-allIn:
			case <-time.After(10 * time.Second):
				arrivedMu.Lock()
				n := arrived
				arrivedMu.Unlock()
				t.Errorf("upstream: only %d of %d concurrent requests arrived", n, concurrent)
			}
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, `{"id":"c","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1000000000000000,"completion_tokens":0}}`)
		default:
			w.WriteHeader(http.StatusTeapot)
		}
	})
	h := newHarness(t)
	buLoad(h, up, "")

	body := `{"model":"gpt-4o","max_tokens":10,"messages":[{"role":"user","content":"Big?"}]}`
	p := estPrompt("Big?")

	// refused checks that user's bucket is empty and refuses the next
	// request with a Retry-After that reflects the debt.
	refused := func(t *testing.T, user string) {
		t.Helper()
		// The level probe charges nothing, but a bucket in debt refuses
		// even that (a zero-cost charge conforms only once the debt has
		// drained): its 429 still reports the level.
		pr := h.post("/v1/models", "", "X-Case", user)
		if pr.status != http.StatusNotFound && pr.status != http.StatusTooManyRequests {
			t.Fatalf("level probe: status %d, want 404 or 429: %s", pr.status, truncate(string(pr.body), 300))
		}
		if l := remaining(t, pr, tokPolicy); l != 0 {
			t.Errorf("after the huge usage: r=%d (probe status %d), want 0 (in debt)", l, pr.status)
		}
		r := buSend(t, h, "/v1/chat/completions", body, "X-Case", user, "X-Mode", "json")
		if r.status != http.StatusTooManyRequests {
			t.Fatalf("the request after the huge usage: status %d, want 429 (the debt was forgiven?); RateLimit %q",
				r.status, r.header.Get("RateLimit"))
		}
		var e openAIError
		decodeStrict(t, "after the huge usage", r.body, &e)
		if e.Error.Type != "tokens" {
			t.Errorf("after the huge usage: error type %q, want tokens", e.Error.Type)
		}
		secs, _ := wantRetryAfter(t, "after the huge usage", r.response)
		if secs < minSecs || secs > maxSecs {
			t.Errorf("Retry-After %d s: want between %d and %d", secs, int64(minSecs), int64(maxSecs))
		}
		wantRemaining(t, "refused", r.response, map[string]int64{tokPolicy: 0})
	}

	for _, mode := range []string{"json", "stream"} {
		t.Run(mode, func(t *testing.T) {
			user := "huge-" + mode
			b := body
			if mode == "stream" {
				b = `{"model":"gpt-4o","stream":true,"max_tokens":10,"messages":[{"role":"user","content":"Big?"}]}`
			}
			r := buSend(t, h, "/v1/chat/completions", b, "X-Case", user, "X-Mode", mode)
			wantStatus(t, mode, r.response, http.StatusOK)
			if r.readErr != nil {
				t.Errorf("%s: the body ended with %v", mode, r.readErr)
			}
			wantRemaining(t, "at admission", r.response, map[string]int64{tokPolicy: tokCap - p - 10})
			refused(t, user)
		})
	}

	// Several requests admitted together, each settling a saturated debt:
	// the debts add up, and must not wrap around to a full bucket.
	t.Run("concurrent", func(t *testing.T) {
		const user = "huge-concurrent"
		type result struct {
			status int
			err    error
		}
		results := make(chan result, concurrent)
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		for range concurrent {
			go func() {
				req := h.newReq(http.MethodPost, "/v1/chat/completions", strings.NewReader(body), "X-Case", user, "X-Mode", "barrier").WithContext(ctx)
				res, err := h.client.Do(req)
				if err != nil {
					results <- result{err: err}
					return
				}
				_, err = io.Copy(io.Discard, res.Body)
				res.Body.Close()
				results <- result{status: res.StatusCode, err: err}
			}()
		}
		for range concurrent {
			if r := <-results; r.err != nil || r.status != http.StatusOK {
				t.Fatalf("concurrent request: status %d, error %v", r.status, r.err)
			}
		}
		refused(t, user)
	})

	// Nothing broke: another user is served.
	r := buSend(t, h, "/v1/chat/completions", body, "X-Case", "huge-after", "X-Mode", "json")
	wantStatus(t, "another user", r.response, http.StatusOK)
}

// 6. An upstream 503 with a JSON body among good answers: the completion
// estimate is refunded, the prompt estimate kept, whatever usage the error
// body claims and however it ends.
func TestBadUpstream503(t *testing.T) {
	const errBody = `{"error":{"message":"The server is overloaded.","type":"server_error","code":"overloaded"},"usage":{"prompt_tokens":500,"completion_tokens":500}}`
	up := startBadUpstream(t, func(w http.ResponseWriter, r *http.Request, body []byte) {
		switch r.Header.Get("X-Mode") {
		case "ok":
			if bytes.Contains(body, []byte(`"stream":true`)) {
				// A stream without usage: settled on its text.
				w.Header().Set("Content-Type", "text/event-stream")
				io.WriteString(w, "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Fine.\"}}]}\n\ndata: [DONE]\n\n")
				return
			}
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, `{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Fine."}}],"usage":{"prompt_tokens":20,"completion_tokens":30}}`)
		case "503":
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(w, errBody)
		case "503 cut":
			// A 503 whose body stops half-way: Content-Length promises
			// more than comes.
			conn, rw := buHijack(t, w)
			if conn == nil {
				return
			}
			defer conn.Close()
			fmt.Fprintf(rw, "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(errBody), errBody[:len(errBody)/2])
			_ = rw.Flush()
		default:
			w.WriteHeader(http.StatusTeapot)
		}
	})
	h := newHarness(t)
	buLoad(h, up, "")

	const user = "svc"
	chat := `{"model":"gpt-4o","max_tokens":400,"messages":[{"role":"user","content":"Are you up?"}]}`
	stream := `{"model":"gpt-4o","stream":true,"max_tokens":300,"messages":[{"role":"user","content":"Stream if you can."}]}`
	pChat, pStream := estPrompt("Are you up?"), estPrompt("Stream if you can.")

	level := int64(tokCap)
	for i, s := range []struct {
		mode, body string
		prompt     int64
		completion int64
		settled    int64
		status     int
	}{
		{"ok", chat, pChat, 400, fakeUsage, http.StatusOK},
		{"503", chat, pChat, 400, pChat, http.StatusServiceUnavailable},
		{"503", stream, pStream, 300, pStream, http.StatusServiceUnavailable},
		{"503 cut", chat, pChat, 400, pChat, http.StatusServiceUnavailable},
		{"ok", stream, pStream, 300, pStream + estPrompt("Fine."), http.StatusOK},
		{"ok", chat, pChat, 400, fakeUsage, http.StatusOK},
	} {
		what := fmt.Sprintf("#%d %s", i+1, s.mode)
		r := buSend(t, h, "/v1/chat/completions", s.body, "X-Case", user, "X-Mode", s.mode)
		wantStatus(t, what, r.response, s.status)
		wantRemaining(t, what+" at admission", r.response, map[string]int64{tokPolicy: level - s.prompt - s.completion})
		switch s.mode {
		case "503":
			if r.readErr != nil || string(r.body) != errBody {
				t.Errorf("%s: the client got %q (%v), want the upstream's body", what, r.body, r.readErr)
			}
		case "503 cut":
			wantCutShort(t, what, r, s.status, errBody[:len(errBody)/2])
		}
		level -= s.settled
		if l := h.level(t, user); l != level {
			t.Errorf("%s: r=%d, want %d (settled at %d)", what, l, level, s.settled)
		}
	}
}

// 7. A gzip-compressed response. The module drops the client's
// Accept-Encoding so that the usage can be read.
func TestBadUpstreamGzip(t *testing.T) {
	const plain = `{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Zipped."}}],"usage":{"prompt_tokens":20,"completion_tokens":30}}`
	var zbuf bytes.Buffer
	zw := gzip.NewWriter(&zbuf)
	io.WriteString(zw, plain)
	zw.Close()
	zipped := zbuf.Bytes()

	// The upstream compresses whatever it was asked.
	up := startBadUpstream(t, func(w http.ResponseWriter, r *http.Request, body []byte) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Encoding", "gzip")
		w.Header().Set("Content-Length", strconv.Itoa(len(zipped)))
		w.Write(zipped)
	})
	body := `{"model":"gpt-4o","max_tokens":200,"messages":[{"role":"user","content":"Compress this."}]}`
	est := estPrompt("Compress this.") + 200

	// The client asks for gzip itself, so that its transport hands over
	// the bytes as they came.
	send := func(t *testing.T, h *harness, user string) buResult {
		t.Helper()
		r := buSend(t, h, "/v1/chat/completions", body, "X-Case", user, "Accept-Encoding", "gzip")
		wantStatus(t, user, r.response, http.StatusOK)
		if r.readErr != nil {
			t.Errorf("%s: the body ended with %v", user, r.readErr)
		}
		wantRemaining(t, user+" at admission", r.response, map[string]int64{tokPolicy: tokCap - est})
		return r
	}

	t.Run("transport compression off", func(t *testing.T) {
		// Nothing between the module and the upstream asks for or decodes
		// gzip: the upstream compresses unasked, the module cannot read the
		// usage, and the estimate stands.
		h := newHarness(t)
		buLoad(h, up, "\t\ttransport http {\n\t\t\tcompression off\n\t\t}")
		before := len(up.received())
		r := send(t, h, "gz-off")
		if got := up.received()[before:]; len(got) != 1 {
			t.Errorf("upstream received %d requests, want 1", len(got))
		} else if ae := got[0].header.Values("Accept-Encoding"); len(ae) != 0 {
			t.Errorf("upstream request Accept-Encoding %q, want none", ae)
		}
		if ce := r.header.Get("Content-Encoding"); ce != "gzip" {
			t.Errorf("Content-Encoding %q, want gzip", ce)
		}
		if !bytes.Equal(r.body, zipped) {
			t.Errorf("the client received %d bytes, not the %d compressed bytes the upstream sent", len(r.body), len(zipped))
		}
		if l := h.level(t, "gz-off"); l != tokCap-est {
			t.Errorf("r=%d, want %d (the estimate %d stands)", l, tokCap-est, est)
		}
	})

	t.Run("default transport", func(t *testing.T) {
		// With Caddy's default transport, Go's http.Transport asks the
		// upstream for gzip itself once the module has dropped the
		// client's Accept-Encoding, and decompresses the answer: the module
		// reads the usage, and the client receives the JSON uncompressed.
		h := newHarness(t)
		buLoad(h, up, "")
		before := len(up.received())
		r := send(t, h, "gz-default")
		if got := up.received()[before:]; len(got) != 1 {
			t.Errorf("upstream received %d requests, want 1", len(got))
		} else if ae := got[0].header.Values("Accept-Encoding"); len(ae) != 1 || ae[0] != "gzip" {
			t.Errorf("upstream request Accept-Encoding %q, want gzip (added by Caddy's transport)", ae)
		}
		if ce := r.header.Get("Content-Encoding"); ce != "" {
			t.Errorf("Content-Encoding %q, want none (decoded by Caddy's transport)", ce)
		}
		if string(r.body) != plain {
			t.Errorf("the client received %q, want the decompressed JSON", truncate(string(r.body), 300))
		}
		if l := h.level(t, "gz-default"); l != tokCap-fakeUsage {
			t.Errorf("r=%d, want %d (the usage, 20 + 30, read from the decoded body)", l, tokCap-fakeUsage)
		}
	})
}
