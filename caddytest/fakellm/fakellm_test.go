package fakellm

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeClock is a manually advanced clock for driving the limiter.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *fakeClock {
	return &fakeClock{t: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func start(t *testing.T, cfg Config) *Server {
	t.Helper()
	s, err := Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

// do sends a request and returns the response; the caller closes it.
func do(t *testing.T, ctx context.Context, method, url, body string) *http.Response {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// post sends a POST and returns the status, headers and whole body.
func post(t *testing.T, s *Server, path, body string) (int, http.Header, []byte) {
	t.Helper()
	resp := do(t, context.Background(), http.MethodPost, s.URL+path, body)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, resp.Header, b
}

// decode unmarshals b into a fresh T, failing the test on error.
func decode[T any](t *testing.T, b []byte) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("decode %T: %v\n%s", v, err, b)
	}
	return v
}

type sseEvent struct{ name, data string }

// readEvent reads one server-sent event, the lines up to a blank line.
func readEvent(br *bufio.Reader) (sseEvent, error) {
	var ev sseEvent
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return ev, err
		}
		line = strings.TrimRight(line, "\n")
		switch {
		case line == "":
			return ev, nil
		case strings.HasPrefix(line, "event: "):
			ev.name = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: "):
			ev.data = strings.TrimPrefix(line, "data: ")
		default:
			return ev, errors.New("unexpected SSE line " + line)
		}
	}
}

// streamEvents posts body and reads every SSE event of the response.
func streamEvents(t *testing.T, s *Server, path, body string) []sseEvent {
	t.Helper()
	resp := do(t, context.Background(), http.MethodPost, s.URL+path, body)
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("status %d: %s", resp.StatusCode, b)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("Content-Type %q", ct)
	}
	br := bufio.NewReader(resp.Body)
	var evs []sseEvent
	for {
		ev, err := readEvent(br)
		if err == io.EOF && ev == (sseEvent{}) {
			return evs
		}
		if err != nil {
			t.Fatalf("reading event %d: %v", len(evs), err)
		}
		evs = append(evs, ev)
	}
}

// streamLines posts body and returns the response's lines.
func streamLines(t *testing.T, s *Server, path, body, wantType string) []string {
	t.Helper()
	resp := do(t, context.Background(), http.MethodPost, s.URL+path, body)
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); resp.StatusCode != http.StatusOK || ct != wantType {
		t.Fatalf("status %d, Content-Type %q", resp.StatusCode, ct)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

const wantText = "fake1 fake2 fake3"

func TestOpenAIChat(t *testing.T) {
	s := start(t, Config{PromptTokens: 7, CompletionTokens: 5})
	for _, path := range []string{"/v1/chat/completions", "/openai/deployments/gpt4o-dep/chat/completions?api-version=2024-10-21"} {
		wantModel := "gpt-4o"
		if strings.Contains(path, "deployments") {
			wantModel = "gpt4o-dep"
		}
		t.Run(path, func(t *testing.T) {
			code, _, b := post(t, s, path, `{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"unknown":{"x":1}}`)
			if code != 200 {
				t.Fatalf("status %d: %s", code, b)
			}
			r := decode[struct {
				Object  string
				Model   string
				Choices []struct {
					Message      struct{ Role, Content string }
					FinishReason string `json:"finish_reason"`
				}
			}](t, b)
			u := decode[struct {
				Usage struct {
					P int `json:"prompt_tokens"`
					C int `json:"completion_tokens"`
					T int `json:"total_tokens"`
				}
			}](t, b).Usage
			if r.Object != "chat.completion" || r.Model != wantModel || len(r.Choices) != 1 ||
				r.Choices[0].Message.Content != wantText || r.Choices[0].Message.Role != "assistant" ||
				r.Choices[0].FinishReason != "stop" || u.P != 7 || u.C != 5 || u.T != 12 {
				t.Fatalf("unexpected response %s", b)
			}

			for _, withUsage := range []bool{false, true} {
				body := `{"model":"gpt-4o","stream":true,"messages":[]}`
				if withUsage {
					body = `{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}`
				}
				evs := streamEvents(t, s, path, body)
				want := 3 + 1
				if withUsage {
					want++
				}
				if len(evs) != want || evs[len(evs)-1].data != "[DONE]" {
					t.Fatalf("include_usage=%v: got %d events %+v", withUsage, len(evs), evs)
				}
				var text strings.Builder
				for i, ev := range evs[:3] {
					c := decode[struct {
						Object  string
						Model   string
						Choices []struct {
							Delta        struct{ Role, Content string }
							FinishReason *string `json:"finish_reason"`
						}
						Usage any
					}](t, []byte(ev.data))
					if c.Object != "chat.completion.chunk" || c.Model != wantModel || len(c.Choices) != 1 {
						t.Fatalf("chunk %d: %s", i, ev.data)
					}
					if (i == 2) != (c.Choices[0].FinishReason != nil) || (i == 0) != (c.Choices[0].Delta.Role == "assistant") {
						t.Fatalf("chunk %d finish/role: %s", i, ev.data)
					}
					text.WriteString(c.Choices[0].Delta.Content)
				}
				if text.String() != wantText {
					t.Fatalf("streamed text %q", text.String())
				}
				if withUsage {
					f := decode[struct {
						Choices []any
						Usage   struct {
							P int `json:"prompt_tokens"`
							C int `json:"completion_tokens"`
							T int `json:"total_tokens"`
						}
					}](t, []byte(evs[3].data))
					if f.Choices == nil || len(f.Choices) != 0 || f.Usage.P != 7 || f.Usage.C != 5 || f.Usage.T != 12 {
						t.Fatalf("usage chunk %s", evs[3].data)
					}
				}
			}
		})
	}
}

func TestOpenAICompletions(t *testing.T) {
	s := start(t, Config{PromptTokens: 3})
	for _, path := range []string{"/v1/completions", "/openai/deployments/dep/completions?api-version=x"} {
		code, _, b := post(t, s, path, `{"model":"davinci","prompt":"hi"}`)
		r := decode[struct {
			Object  string
			Choices []struct{ Text string }
			Usage   struct {
				T int `json:"total_tokens"`
			}
		}](t, b)
		if code != 200 || r.Object != "text_completion" || len(r.Choices) != 1 || r.Choices[0].Text != wantText || r.Usage.T != 13 {
			t.Fatalf("%s: %d %s", path, code, b)
		}
		evs := streamEvents(t, s, path, `{"model":"davinci","stream":true,"stream_options":{"include_usage":true}}`)
		if len(evs) != 5 || evs[4].data != "[DONE]" {
			t.Fatalf("events %+v", evs)
		}
		var text strings.Builder
		for _, ev := range evs[:3] {
			c := decode[struct {
				Object  string
				Choices []struct{ Text string }
			}](t, []byte(ev.data))
			if c.Object != "text_completion" {
				t.Fatalf("chunk %s", ev.data)
			}
			text.WriteString(c.Choices[0].Text)
		}
		u := decode[struct {
			Choices []any
			Usage   struct {
				C int `json:"completion_tokens"`
			}
		}](t, []byte(evs[3].data))
		if text.String() != wantText || len(u.Choices) != 0 || u.Usage.C != 10 {
			t.Fatalf("text %q, usage chunk %s", text.String(), evs[3].data)
		}
	}
}

func TestEmbeddings(t *testing.T) {
	s := start(t, Config{PromptTokens: 4})
	for _, path := range []string{"/v1/embeddings", "/openai/deployments/emb/embeddings?api-version=x"} {
		code, _, b := post(t, s, path, `{"model":"text-embedding-3-small","input":["a","b"]}`)
		r := decode[struct {
			Object string
			Model  string
			Data   []struct {
				Object    string
				Index     int
				Embedding []float64
			}
			Usage struct {
				P int `json:"prompt_tokens"`
				T int `json:"total_tokens"`
			}
		}](t, b)
		if code != 200 || r.Object != "list" || len(r.Data) != 2 || r.Data[1].Index != 1 ||
			r.Data[0].Object != "embedding" || len(r.Data[0].Embedding) == 0 || r.Usage.P != 4 || r.Usage.T != 4 {
			t.Fatalf("%s: %d %s", path, code, b)
		}
	}
	_, _, b := post(t, s, "/v1/embeddings", `{"model":"m","input":"one"}`)
	if n := len(decode[struct{ Data []any }](t, b).Data); n != 1 {
		t.Fatalf("single input gave %d embeddings", n)
	}
}

func TestOpenAIResponses(t *testing.T) {
	s := start(t, Config{PromptTokens: 2, CompletionTokens: 6})
	type response struct {
		Object string
		Status string
		Model  string
		Output []struct {
			Type    string
			Content []struct{ Type, Text string }
		}
		Usage struct {
			I int `json:"input_tokens"`
			O int `json:"output_tokens"`
			T int `json:"total_tokens"`
		}
	}
	code, _, b := post(t, s, "/v1/responses", `{"model":"gpt-5","input":"hi"}`)
	r := decode[response](t, b)
	if code != 200 || r.Object != "response" || r.Model != "gpt-5" || len(r.Output) != 1 ||
		r.Output[0].Content[0].Text != wantText || r.Usage.I != 2 || r.Usage.O != 6 || r.Usage.T != 8 {
		t.Fatalf("%d %s", code, b)
	}

	evs := streamEvents(t, s, "/v1/responses", `{"model":"gpt-5","input":"hi","stream":true}`)
	if len(evs) != 5 || evs[0].name != "response.created" || evs[4].name != "response.completed" {
		t.Fatalf("events %+v", evs)
	}
	var text strings.Builder
	for _, ev := range evs[1:4] {
		d := decode[struct{ Type, Delta string }](t, []byte(ev.data))
		if ev.name != "response.output_text.delta" || d.Type != ev.name {
			t.Fatalf("delta event %+v", ev)
		}
		text.WriteString(d.Delta)
	}
	done := decode[struct {
		Type     string
		Response response
	}](t, []byte(evs[4].data))
	if text.String() != wantText || done.Type != "response.completed" || done.Response.Usage.T != 8 ||
		done.Response.Output[0].Content[0].Text != wantText {
		t.Fatalf("text %q, completed %s", text.String(), evs[4].data)
	}
}

func TestAnthropic(t *testing.T) {
	s := start(t, Config{PromptTokens: 9, CompletionTokens: 4})
	type usage struct {
		In  int  `json:"input_tokens"`
		Out int  `json:"output_tokens"`
		CC  *int `json:"cache_creation_input_tokens"`
		CR  *int `json:"cache_read_input_tokens"`
	}
	type message struct {
		ID, Type, Role, Model string
		Content               []struct{ Type, Text string }
		StopReason            string `json:"stop_reason"`
		Usage                 usage
	}
	code, _, b := post(t, s, "/v1/messages", `{"model":"claude-x","max_tokens":10,"messages":[]}`)
	m := decode[message](t, b)
	if code != 200 || m.Type != "message" || m.Role != "assistant" || m.Model != "claude-x" || m.ID == "" ||
		len(m.Content) != 1 || m.Content[0].Type != "text" || m.Content[0].Text != wantText ||
		m.StopReason != "end_turn" || m.Usage.In != 9 || m.Usage.Out != 4 || m.Usage.CC == nil || m.Usage.CR == nil {
		t.Fatalf("%d %s", code, b)
	}

	evs := streamEvents(t, s, "/v1/messages", `{"model":"claude-x","stream":true}`)
	names := make([]string, len(evs))
	for i, ev := range evs {
		names[i] = ev.name
		if typ := decode[struct{ Type string }](t, []byte(ev.data)).Type; typ != ev.name {
			t.Fatalf("event %s has type %q", ev.name, typ)
		}
	}
	want := "message_start content_block_start content_block_delta content_block_delta content_block_delta content_block_stop message_delta message_stop"
	if strings.Join(names, " ") != want {
		t.Fatalf("events %v", names)
	}
	start := decode[struct{ Message message }](t, []byte(evs[0].data)).Message
	if start.Model != "claude-x" || start.Usage.In != 9 || start.Usage.Out != 1 {
		t.Fatalf("message_start %s", evs[0].data)
	}
	var text strings.Builder
	for _, ev := range evs[2:5] {
		d := decode[struct{ Delta struct{ Type, Text string } }](t, []byte(ev.data)).Delta
		if d.Type != "text_delta" {
			t.Fatalf("delta %s", ev.data)
		}
		text.WriteString(d.Text)
	}
	md := decode[struct {
		Delta struct {
			StopReason string `json:"stop_reason"`
		}
		Usage usage
	}](t, []byte(evs[6].data))
	if text.String() != wantText || md.Delta.StopReason != "end_turn" || md.Usage.Out != 4 {
		t.Fatalf("text %q, message_delta %s", text.String(), evs[6].data)
	}
}

type geminiResp struct {
	Candidates []struct {
		Content struct {
			Parts []struct{ Text string }
			Role  string
		}
		FinishReason string
	}
	UsageMetadata struct {
		PromptTokenCount, CandidatesTokenCount, TotalTokenCount int
	}
	ModelVersion string
}

func TestGemini(t *testing.T) {
	s := start(t, Config{PromptTokens: 5, CompletionTokens: 9})
	code, _, b := post(t, s, "/v1beta/models/gemini-2.5-flash:generateContent", `{"contents":[{"parts":[{"text":"hi"}]}]}`)
	r := decode[geminiResp](t, b)
	if code != 200 || len(r.Candidates) != 1 || r.Candidates[0].Content.Parts[0].Text != wantText ||
		r.Candidates[0].Content.Role != "model" || r.Candidates[0].FinishReason != "STOP" ||
		r.UsageMetadata.PromptTokenCount != 5 || r.UsageMetadata.CandidatesTokenCount != 9 ||
		r.UsageMetadata.TotalTokenCount != 14 || r.ModelVersion != "gemini-2.5-flash" {
		t.Fatalf("%d %s", code, b)
	}

	check := func(chunks []geminiResp) {
		t.Helper()
		if len(chunks) != 3 {
			t.Fatalf("%d chunks", len(chunks))
		}
		var text strings.Builder
		prev := 0
		for i, c := range chunks {
			text.WriteString(c.Candidates[0].Content.Parts[0].Text)
			u := c.UsageMetadata
			if u.CandidatesTokenCount < prev || u.PromptTokenCount != 5 || u.TotalTokenCount != 5+u.CandidatesTokenCount ||
				(i == 2) != (c.Candidates[0].FinishReason == "STOP") || c.ModelVersion != "gemini-2.5-flash" {
				t.Fatalf("chunk %d: %+v", i, c)
			}
			prev = u.CandidatesTokenCount
		}
		if text.String() != wantText || prev != 9 {
			t.Fatalf("text %q, final candidates tokens %d", text.String(), prev)
		}
	}

	var chunks []geminiResp
	for _, ev := range streamEvents(t, s, "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", `{}`) {
		chunks = append(chunks, decode[geminiResp](t, []byte(ev.data)))
	}
	check(chunks)

	// Without alt=sse: one JSON array, an element per line, so each can be
	// flushed as it is produced.
	lines := streamLines(t, s, "/v1beta/models/gemini-2.5-flash:streamGenerateContent", `{}`, "application/json")
	if len(lines) != 4 || !strings.HasPrefix(lines[0], "[{") || !strings.HasPrefix(lines[1], ",{") ||
		!strings.HasPrefix(lines[2], ",{") || lines[3] != "]" {
		t.Fatalf("array stream lines %q", lines)
	}
	check(decode[[]geminiResp](t, []byte(strings.Join(lines, "\n"))))
}

func TestOllama(t *testing.T) {
	s := start(t, Config{PromptTokens: 6, CompletionTokens: 3})
	type line struct {
		Model     string
		CreatedAt string `json:"created_at"`
		Message   *struct{ Role, Content string }
		Response  *string
		Done      bool
		PEC       int `json:"prompt_eval_count"`
		EC        int `json:"eval_count"`
	}
	text := func(l line) string {
		if l.Message != nil {
			return l.Message.Content
		}
		return *l.Response
	}
	for _, path := range []string{"/api/chat", "/api/generate"} {
		// Streaming is the default when "stream" is absent.
		lines := streamLines(t, s, path, `{"model":"llama3"}`, "application/x-ndjson")
		if len(lines) != 4 {
			t.Fatalf("%s: lines %q", path, lines)
		}
		var got strings.Builder
		for i, ln := range lines {
			l := decode[line](t, []byte(ln))
			if l.Model != "llama3" || l.CreatedAt == "" || l.Done != (i == 3) ||
				(path == "/api/chat") != (l.Message != nil) || (path == "/api/generate") != (l.Response != nil) {
				t.Fatalf("%s line %d: %s", path, i, ln)
			}
			got.WriteString(text(l))
			if l.Done && (l.PEC != 6 || l.EC != 3) {
				t.Fatalf("%s final line %s", path, ln)
			}
		}
		if got.String() != wantText {
			t.Fatalf("%s: text %q", path, got.String())
		}

		code, h, b := post(t, s, path, `{"model":"llama3","stream":false}`)
		l := decode[line](t, b)
		if code != 200 || h.Get("Content-Type") != "application/json" || !l.Done || text(l) != wantText || l.PEC != 6 || l.EC != 3 {
			t.Fatalf("%s non-stream: %d %s", path, code, b)
		}
	}
	code, _, b := post(t, s, "/api/embed", `{"model":"nomic","input":["a","b","c"]}`)
	e := decode[struct {
		Model      string
		Embeddings [][]float64
		PEC        int `json:"prompt_eval_count"`
	}](t, b)
	if code != 200 || e.Model != "nomic" || len(e.Embeddings) != 3 || len(e.Embeddings[0]) == 0 || e.PEC != 6 {
		t.Fatalf("embed: %d %s", code, b)
	}
}

// TestStreamsFlushPerEvent holds every kind of stream open after its first
// content chunk: the chunk can only be read if the server flushed it.
func TestStreamsFlushPerEvent(t *testing.T) {
	s := start(t, Config{StreamChunks: 2, ChunkDelay: time.Hour})
	cases := []struct{ path, body string }{
		{"/v1/chat/completions", `{"model":"m","stream":true}`},
		{"/openai/deployments/d/chat/completions?api-version=1", `{"stream":true}`},
		{"/v1/completions", `{"model":"m","stream":true}`},
		{"/v1/responses", `{"model":"m","stream":true}`},
		{"/v1/messages", `{"model":"m","stream":true}`},
		{"/v1beta/models/g:streamGenerateContent?alt=sse", `{}`},
		{"/v1beta/models/g:streamGenerateContent", `{}`},
		{"/api/chat", `{"model":"m"}`},
		{"/api/generate", `{"model":"m"}`},
	}
	for _, tc := range cases {
		t.Run(tc.path, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			resp := do(t, ctx, http.MethodPost, s.URL+tc.path, tc.body)
			defer resp.Body.Close()
			br := bufio.NewReader(resp.Body)
			for {
				line, err := br.ReadString('\n')
				if err != nil {
					t.Fatalf("first chunk never arrived: %v", err)
				}
				if strings.Contains(line, "fake2") {
					t.Fatalf("second chunk arrived despite the delay: %q", line)
				}
				if strings.Contains(line, "fake1") {
					return
				}
			}
		})
	}
}

func TestRPMLimit(t *testing.T) {
	clock := newClock()
	s := start(t, Config{RPM: 60, Burst: 2, Now: clock.Now, RateLimitHeaders: true})
	chat := func() (int, http.Header, []byte) {
		return post(t, s, "/v1/chat/completions", `{"model":"m"}`)
	}
	for i := range 2 {
		if code, _, b := chat(); code != 200 {
			t.Fatalf("request %d within burst: %d %s", i, code, b)
		}
	}
	code, h, b := chat()
	if code != http.StatusTooManyRequests {
		t.Fatalf("want 429 after burst, got %d", code)
	}
	e := decode[struct {
		Error struct {
			Message string
			Type    string
			Param   *string
			Code    string
		}
	}](t, b)
	if e.Error.Type != "requests" || e.Error.Code != "rate_limit_exceeded" || e.Error.Message == "" ||
		!strings.Contains(string(b), `"param":null`) {
		t.Fatalf("429 body %s", b)
	}
	if h.Get("retry-after") != "1" || h.Get("retry-after-ms") != "1000" || h.Get("x-ratelimit-remaining-requests") != "0" {
		t.Fatalf("429 headers %v", h)
	}

	clock.Advance(500 * time.Millisecond)
	if code, h, _ := chat(); code != 429 || h.Get("retry-after") != "1" || h.Get("retry-after-ms") != "500" {
		t.Fatalf("half refilled: %d %v", code, h)
	}
	clock.Advance(500 * time.Millisecond)
	if code, _, b := chat(); code != 200 {
		t.Fatalf("after refill: %d %s", code, b)
	}
	if code, _, _ := chat(); code != 429 {
		t.Fatalf("refill gave more than one token: %d", code)
	}
	// The bucket never holds more than Burst, however long the wait.
	clock.Advance(time.Hour)
	for i, want := range []int{200, 200, 429} {
		if code, _, _ := chat(); code != want {
			t.Fatalf("after long wait, request %d: %d, want %d", i, code, want)
		}
	}
	if total, limited := s.Counts(); total != 9 || limited != 4 {
		t.Fatalf("Counts = %d, %d", total, limited)
	}

	s.Reset()
	if total, limited := s.Counts(); total != 0 || limited != 0 || len(s.Requests()) != 0 {
		t.Fatalf("after Reset: %d %d %d", total, limited, len(s.Requests()))
	}
	if code, _, _ := chat(); code != 200 {
		t.Fatalf("Reset did not refill the bucket: %d", code)
	}
}

func TestDefaultBurst(t *testing.T) {
	clock := newClock()
	s := start(t, Config{RPM: 121, Now: clock.Now}) // 121/60 rounds up to 3
	for i, want := range []int{200, 200, 200, 429} {
		if code, _, _ := post(t, s, "/v1/chat/completions", `{}`); code != want {
			t.Fatalf("request %d: %d, want %d", i, code, want)
		}
	}
}

func TestRateLimitShapes(t *testing.T) {
	clock := newClock()
	s := start(t, Config{RPM: 1, Now: clock.Now, RateLimitHeaders: true})
	cases := []struct {
		path  string
		check func(b []byte) bool
	}{
		{"/openai/deployments/d/chat/completions?api-version=1", func(b []byte) bool {
			e := decode[struct{ Error struct{ Type, Code string } }](t, b)
			return e.Error.Type == "requests" && e.Error.Code == "rate_limit_exceeded"
		}},
		{"/v1/messages", func(b []byte) bool {
			e := decode[struct {
				Type  string
				Error struct{ Type, Message string }
			}](t, b)
			return e.Type == "error" && e.Error.Type == "rate_limit_error" && e.Error.Message != ""
		}},
		{"/v1beta/models/g:generateContent", func(b []byte) bool {
			e := decode[struct {
				Error struct {
					Code    int
					Message string
					Status  string
					Details []map[string]string
				}
			}](t, b).Error
			return e.Code == 429 && e.Message != "" && e.Status == "RESOURCE_EXHAUSTED" && len(e.Details) == 1 &&
				e.Details[0]["@type"] == "type.googleapis.com/google.rpc.RetryInfo" && e.Details[0]["retryDelay"] == "60s"
		}},
		{"/api/chat", func(b []byte) bool {
			return decode[struct{ Error string }](t, b).Error != ""
		}},
	}
	for _, tc := range cases {
		s.Reset()
		if code, _, b := post(t, s, tc.path, `{"stream":false}`); code != 200 {
			t.Fatalf("%s: first request %d %s", tc.path, code, b)
		}
		code, h, b := post(t, s, tc.path, `{"stream":false}`)
		if code != 429 || !tc.check(b) || h.Get("retry-after") != "60" || h.Get("retry-after-ms") != "60000" {
			t.Fatalf("%s: %d %v %s", tc.path, code, h, b)
		}
	}
}

func TestRateLimitHeaders(t *testing.T) {
	clock := newClock()
	s := start(t, Config{RPM: 600, TPM: 6000, PromptTokens: 90, Now: clock.Now, RateLimitHeaders: true})
	_, h, _ := post(t, s, "/v1/chat/completions", `{}`)
	want := map[string]string{
		"x-ratelimit-limit-requests":     "600",
		"x-ratelimit-remaining-requests": "9", // burst 10
		"x-ratelimit-reset-requests":     "100ms",
		"x-ratelimit-limit-tokens":       "6000",
		"x-ratelimit-remaining-tokens":   "5900",
		"x-ratelimit-reset-tokens":       "1s",
	}
	for k, v := range want {
		if got := h.Get(k); got != v {
			t.Errorf("%s = %q, want %q", k, got, v)
		}
	}
	if h.Get("retry-after") != "" {
		t.Errorf("retry-after on a 200")
	}

	_, h, _ = post(t, s, "/v1/messages", `{}`)
	wantA := map[string]string{
		"anthropic-ratelimit-requests-limit":     "600",
		"anthropic-ratelimit-requests-remaining": "8",
		"anthropic-ratelimit-requests-reset":     "2030-01-02T03:04:06Z", // 200ms, rounded up
		"anthropic-ratelimit-tokens-limit":       "6000",
		"anthropic-ratelimit-tokens-remaining":   "5800",
		"anthropic-ratelimit-tokens-reset":       "2030-01-02T03:04:07Z",
	}
	for k, v := range wantA {
		if got := h.Get(k); got != v {
			t.Errorf("%s = %q, want %q", k, got, v)
		}
	}
	if h.Get("x-ratelimit-limit-requests") != "" {
		t.Errorf("OpenAI headers on an Anthropic response")
	}

	// Off by default.
	plain := start(t, Config{RPM: 600})
	if _, h, _ := post(t, plain, "/v1/chat/completions", `{}`); h.Get("x-ratelimit-limit-requests") != "" {
		t.Errorf("headers sent without RateLimitHeaders")
	}
}

func TestTPMLimit(t *testing.T) {
	clock := newClock()
	s := start(t, Config{TPM: 60, PromptTokens: 20, CompletionTokens: 10, Now: clock.Now, RateLimitHeaders: true})
	for i, want := range []int{200, 200, 429} {
		code, h, b := post(t, s, "/v1/chat/completions", `{}`)
		if code != want {
			t.Fatalf("request %d: %d %s", i, code, b)
		}
		if code == 429 {
			if decode[struct{ Error struct{ Type string } }](t, b).Error.Type != "tokens" || h.Get("retry-after") != "30" {
				t.Fatalf("429: %v %s", h, b)
			}
		}
	}
	clock.Advance(30 * time.Second)
	if code, _, _ := post(t, s, "/v1/chat/completions", `{}`); code != 200 {
		t.Fatalf("after refill: %d", code)
	}
}

func TestMaxConcurrent(t *testing.T) {
	s := start(t, Config{MaxConcurrent: 1, StreamChunks: 2, ChunkDelay: time.Hour})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	held := do(t, ctx, http.MethodPost, s.URL+"/v1/chat/completions", `{"model":"m","stream":true}`)
	defer held.Body.Close()
	// Once the first event is read the stream is certainly in flight,
	// and it stays so until cancelled.
	if _, err := readEvent(bufio.NewReader(held.Body)); err != nil {
		t.Fatal(err)
	}
	if n := s.InFlight(); n != 1 {
		t.Fatalf("InFlight = %d", n)
	}

	code, _, b := post(t, s, "/v1/chat/completions", `{"model":"m"}`)
	e := decode[struct {
		Error struct{ Type, Message string }
	}](t, b)
	if code != http.StatusServiceUnavailable || e.Error.Message == "" {
		t.Fatalf("over the cap: %d %s", code, b)
	}
	if code, _, b := post(t, s, "/v1/messages", `{}`); code != 503 ||
		decode[struct{ Error struct{ Type string } }](t, b).Error.Type != "overloaded_error" {
		t.Fatalf("anthropic over the cap: %d %s", code, b)
	}
	if total, limited := s.Counts(); total != 3 || limited != 2 {
		t.Fatalf("Counts = %d, %d", total, limited)
	}

	cancel()
	deadline := time.Now().Add(10 * time.Second)
	for s.InFlight() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("cancelled stream kept its slot")
		}
		time.Sleep(time.Millisecond)
	}
	if code, _, b := post(t, s, "/v1/chat/completions", `{"model":"m"}`); code != 200 {
		t.Fatalf("after release: %d %s", code, b)
	}
}

func TestRecording(t *testing.T) {
	clock := newClock()
	s := start(t, Config{RPM: 60, Burst: 1, Now: clock.Now})
	bodies := []string{`{"model":"a","messages":[{"role":"user","content":"héllo"}]}`, `{"model":"b"}`}
	for _, body := range bodies {
		req, _ := http.NewRequest(http.MethodPost, s.URL+"/openai/deployments/d/chat/completions?api-version=2024-10-21", strings.NewReader(body))
		req.Header.Set("Api-Key", "secret")
		req.Header.Add("X-Multi", "1")
		req.Header.Add("X-Multi", "2")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	got := s.Requests()
	if len(got) != 2 {
		t.Fatalf("%d records", len(got))
	}
	for i, r := range got {
		sum := sha256.Sum256([]byte(bodies[i]))
		if r.Method != "POST" || r.Path != "/openai/deployments/d/chat/completions" || r.RawQuery != "api-version=2024-10-21" ||
			r.BodySHA256 != hex.EncodeToString(sum[:]) || r.BodyLen != len(bodies[i]) ||
			r.Header.Get("Api-Key") != "secret" || strings.Join(r.Header.Values("X-Multi"), ",") != "1,2" {
			t.Fatalf("record %d: %+v", i, r)
		}
	}
	// The second was refused, and is recorded all the same.
	if got[0].Status != 200 || got[1].Status != 429 {
		t.Fatalf("statuses %d %d", got[0].Status, got[1].Status)
	}
	// Requests returns a copy.
	got[0].Header.Set("Api-Key", "changed")
	if s.Requests()[0].Header.Get("Api-Key") != "secret" {
		t.Fatal("Requests shares headers with the server")
	}
}

func TestErrors(t *testing.T) {
	s := start(t, Config{})
	code, h, b := post(t, s, "/v2/nothing", `{}`)
	if code != 404 || h.Get("Content-Type") != "application/json" || decode[struct{ Error struct{ Message string } }](t, b).Error.Message == "" {
		t.Fatalf("unknown path: %d %s", code, b)
	}
	code, _, b = post(t, s, "/v1beta/models/g:countTokens", `{}`)
	if code != 404 || decode[struct{ Error struct{ Status string } }](t, b).Error.Status != "NOT_FOUND" {
		t.Fatalf("unknown Gemini method: %d %s", code, b)
	}
	resp := do(t, context.Background(), http.MethodGet, s.URL+"/v1/chat/completions", "")
	resp.Body.Close()
	if resp.StatusCode != 405 {
		t.Fatalf("GET: %d", resp.StatusCode)
	}

	malformed := []struct {
		path  string
		check func(b []byte) bool
	}{
		{"/v1/chat/completions", func(b []byte) bool {
			return decode[struct{ Error struct{ Type string } }](t, b).Error.Type == "invalid_request_error"
		}},
		{"/v1/messages", func(b []byte) bool {
			e := decode[struct {
				Type  string
				Error struct{ Type string }
			}](t, b)
			return e.Type == "error" && e.Error.Type == "invalid_request_error"
		}},
		{"/v1beta/models/g:generateContent", func(b []byte) bool {
			e := decode[struct {
				Error struct {
					Code   int
					Status string
				}
			}](t, b).Error
			return e.Code == 400 && e.Status == "INVALID_ARGUMENT"
		}},
		{"/api/generate", func(b []byte) bool { return decode[struct{ Error string }](t, b).Error != "" }},
	}
	for _, tc := range malformed {
		for _, body := range []string{`{"model":`, ``, `[1]`, `null`, `{} {}`} {
			if code, _, b := post(t, s, tc.path, body); code != 400 || !tc.check(b) {
				t.Fatalf("%s with %q: %d %s", tc.path, body, code, b)
			}
		}
	}
}

func TestDefaultPromptTokens(t *testing.T) {
	s := start(t, Config{})
	body := `{"model":"m","messages":[{"role":"user","content":"0123456789012345678901234567890123456789"}]}`
	_, _, b := post(t, s, "/v1/chat/completions", body)
	u := decode[struct {
		Usage struct {
			P int `json:"prompt_tokens"`
			C int `json:"completion_tokens"`
		}
	}](t, b).Usage
	if u.P != len(body)/4 || u.C != 10 {
		t.Fatalf("usage %+v, body length %d", u, len(body))
	}
	_, _, b = post(t, s, "/v1/chat/completions", `{}`)
	if p := decode[struct {
		Usage struct {
			P int `json:"prompt_tokens"`
		}
	}](t, b).Usage.P; p != 1 {
		t.Fatalf("tiny body: prompt tokens %d", p)
	}
	// A request without a model gets a placeholder rather than an error.
	if m := decode[struct{ Model string }](t, b).Model; m != defaultModel {
		t.Fatalf("model %q", m)
	}
}

func TestHandlerInHTTPTest(t *testing.T) {
	s, err := New(Config{})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s.Handler())
	defer ts.Close()
	defer s.Close()
	resp, err := http.Post(ts.URL+"/api/chat", "application/json", strings.NewReader(`{"model":"m","stream":false}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if total, _ := s.Counts(); resp.StatusCode != 200 || total != 1 || s.URL != "" {
		t.Fatalf("status %d, total %d, URL %q", resp.StatusCode, total, s.URL)
	}
}

func TestCloseAbortsHeldStreams(t *testing.T) {
	s, err := Start(Config{StreamChunks: 2, ChunkDelay: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp := do(t, ctx, http.MethodPost, s.URL+"/v1/messages", `{"stream":true}`)
	defer resp.Body.Close()
	if _, err := readEvent(bufio.NewReader(resp.Body)); err != nil {
		t.Fatal(err)
	}
	closed := make(chan struct{})
	go func() { s.Close(); close(closed) }()
	select {
	case <-closed:
	case <-ctx.Done():
		t.Fatal("Close hung on a held stream")
	}
	s.Close() // idempotent
}

func TestConfigValidation(t *testing.T) {
	if _, err := Start(Config{RPM: -1}); err == nil {
		t.Fatal("negative RPM accepted")
	}
}
