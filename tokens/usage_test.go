package tokens

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
)

// feedChunks writes body to s in the pieces given by sizes (cycled; a
// size of 0 means the rest). Each piece goes through one reused buffer
// that is scribbled over after Write, so retaining p would show.
func feedChunks(s *UsageScanner, body []byte, next func() int) {
	buf := make([]byte, 0, 64<<10)
	for len(body) > 0 {
		n := next()
		if n <= 0 || n > len(body) {
			n = len(body)
		}
		if n > cap(buf) {
			buf = make([]byte, 0, n)
		}
		buf = append(buf[:0], body[:n]...)
		if m, err := s.Write(buf); m != n || err != nil {
			panic(fmt.Sprintf("Write returned %d, %v", m, err))
		}
		for i := range buf {
			buf[i] = 0xFF
		}
		body = body[n:]
	}
}

// splitting is one way of cutting a body into chunks.
type splitting struct {
	name string
	next func() func() int
}

func randomSizes(seed uint64, maxSize int) func() func() int {
	return func() func() int {
		r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
		return func() int { return 1 + r.IntN(maxSize) }
	}
}

var splittings = []splitting{
	{"whole", func() func() int { return func() int { return 0 } }},
	{"bytes", func() func() int { return func() int { return 1 } }},
	{"rand7/1", randomSizes(1, 7)},
	{"rand7/2", randomSizes(2, 7)},
	{"rand64/3", randomSizes(3, 64)},
	{"rand64/4", randomSizes(4, 64)},
	{"rand4096/5", randomSizes(5, 4096)},
	{"rand64k/6", randomSizes(6, 64<<10)},
}

// scanWith feeds body to a scanner that has just handled something else,
// so that Reset is exercised too.
func scanWith(s *UsageScanner, d Dialect, ep Endpoint, ct string, body []byte, next func() int) Usage {
	s.Reset(DialectGemini, EndpointStreamGenerate, "application/json")
	_, _ = s.Write([]byte(`[{"usageMetadata":{"promptTokenCount":5`))
	s.Reset(d, ep, ct)
	feedChunks(s, body, next)
	return s.Usage()
}

// checkAllSplits asserts that every splitting of body gives want, and
// for bodies up to 8 KiB, so does every cut into two pieces.
func checkAllSplits(t *testing.T, d Dialect, ep Endpoint, ct string, body []byte, want Usage) {
	t.Helper()
	var s UsageScanner
	for _, sp := range splittings {
		if got := scanWith(&s, d, ep, ct, body, sp.next()); got != want {
			t.Errorf("%s: got %+v\nwant %+v", sp.name, got, want)
		}
	}
	if s.failed {
		t.Errorf("scanner caught a panic")
	}
	if len(body) > 8<<10 {
		return
	}
	for k := 1; k < len(body); k++ {
		first := true
		next := func() int {
			if first {
				first = false
				return k
			}
			return 0
		}
		if got := scanWith(&s, d, ep, ct, body, next); got != want {
			t.Fatalf("cut at %d: got %+v\nwant %+v", k, got, want)
		}
	}
}

// fakeCall runs one request through a fakellm server in process and
// returns the response's Content-Type and body.
func fakeCall(t *testing.T, cfg fakellm.Config, path, reqBody string) (string, []byte) {
	t.Helper()
	srv, err := fakellm.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	req := httptest.NewRequest(http.MethodPost, path, strings.NewReader(reqBody))
	req.Header.Set("Content-Type", "application/json")
	rec := httptest.NewRecorder()
	srv.Handler().ServeHTTP(rec, req)
	if rec.Code != http.StatusOK {
		t.Fatalf("%s: status %d: %s", path, rec.Code, rec.Body)
	}
	return rec.Header().Get("Content-Type"), rec.Body.Bytes()
}

func TestUsageFakeLLM(t *testing.T) {
	const prompt, completion, chunks = 37, 12, 5
	cfg := fakellm.Config{PromptTokens: prompt, CompletionTokens: completion, StreamChunks: chunks}
	text := "fake1 fake2 fake3 fake4 fake5"
	chars := int64(utf8.RuneCountInString(text))
	reported := Usage{InputTokens: prompt, OutputTokens: completion, Reported: true}
	streamed := reported
	streamed.StreamedChars = chars
	textOnly := Usage{StreamedChars: chars}
	embed := Usage{InputTokens: prompt, Reported: true}

	chat := `{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]`
	cases := []struct {
		name, path, body string
		wantCT           string
		want             Usage
	}{
		{"openai chat", "/v1/chat/completions", chat + `}`, "application/json", reported},
		{"openai chat stream usage", "/v1/chat/completions", chat + `,"stream":true,"stream_options":{"include_usage":true}}`, "text/event-stream", streamed},
		{"openai chat stream no usage", "/v1/chat/completions", chat + `,"stream":true}`, "text/event-stream", textOnly},
		{"openai completions", "/v1/completions", `{"model":"x","prompt":"hi"}`, "application/json", reported},
		{"openai completions stream usage", "/v1/completions", `{"model":"x","prompt":"hi","stream":true,"stream_options":{"include_usage":true}}`, "text/event-stream", streamed},
		{"openai completions stream no usage", "/v1/completions", `{"model":"x","prompt":"hi","stream":true}`, "text/event-stream", textOnly},
		{"openai embeddings", "/v1/embeddings", `{"model":"e","input":["a","b","c"]}`, "application/json", embed},
		{"openai responses", "/v1/responses", `{"model":"o3","input":"hi"}`, "application/json", reported},
		{"openai responses stream", "/v1/responses", `{"model":"o3","input":"hi","stream":true}`, "text/event-stream", streamed},
		{"azure chat", "/openai/deployments/dep/chat/completions?api-version=2024-10-21", chat + `}`, "application/json", reported},
		{"azure chat stream", "/openai/deployments/dep/chat/completions?api-version=2024-10-21", chat + `,"stream":true,"stream_options":{"include_usage":true}}`, "text/event-stream", streamed},
		{"azure embeddings", "/openai/deployments/dep/embeddings?api-version=2024-10-21", `{"input":"a"}`, "application/json", embed},
		{"anthropic", "/v1/messages", `{"model":"claude","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}`, "application/json", reported},
		{"anthropic stream", "/v1/messages", `{"model":"claude","max_tokens":100,"messages":[{"role":"user","content":"hi"}],"stream":true}`, "text/event-stream", streamed},
		{"gemini", "/v1beta/models/gemini-2.0-flash:generateContent", `{"contents":[{"parts":[{"text":"hi"}]}]}`, "application/json", reported},
		{"gemini stream sse", "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", `{"contents":[{"parts":[{"text":"hi"}]}]}`, "text/event-stream", streamed},
		{"gemini stream array", "/v1beta/models/gemini-2.0-flash:streamGenerateContent", `{"contents":[{"parts":[{"text":"hi"}]}]}`, "application/json", streamed},
		{"ollama chat", "/api/chat", `{"model":"llama3","messages":[{"role":"user","content":"hi"}],"stream":false}`, "application/json", reported},
		{"ollama chat stream", "/api/chat", `{"model":"llama3","messages":[{"role":"user","content":"hi"}]}`, "application/x-ndjson", streamed},
		{"ollama generate", "/api/generate", `{"model":"llama3","prompt":"hi","stream":false}`, "application/json", reported},
		{"ollama generate stream", "/api/generate", `{"model":"llama3","prompt":"hi"}`, "application/x-ndjson", streamed},
		{"ollama embed", "/api/embed", `{"model":"m","input":["a","b"]}`, "application/json", embed},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ct, body := fakeCall(t, cfg, tc.path, tc.body)
			if ct != tc.wantCT {
				t.Fatalf("Content-Type %q, want %q", ct, tc.wantCT)
			}
			path, _, _ := strings.Cut(tc.path, "?")
			d, ep, _ := Route(http.MethodPost, path)
			if d == DialectUnknown {
				t.Fatalf("Route(%s) is unknown", path)
			}
			checkAllSplits(t, d, ep, ct, body, tc.want)

			// A client that goes away mid-stream: whatever was seen of
			// the prefix, never more than the whole, and never a panic.
			var s UsageScanner
			s.Reset(d, ep, ct)
			_, _ = s.Write(body[:len(body)/2])
			part := s.Usage()
			if part.StreamedChars > tc.want.StreamedChars || part.InputTokens > tc.want.InputTokens ||
				part.OutputTokens > tc.want.OutputTokens {
				t.Errorf("prefix gave %+v, more than the whole %+v", part, tc.want)
			}
		})
	}
}

// sse renders events as a provider would: each JSON value on a data line,
// named when name is set, separated by blank lines, with the line ending
// eol.
func sse(eol string, events ...[2]string) []byte {
	var b strings.Builder
	for _, ev := range events {
		if ev[0] != "" {
			b.WriteString("event: " + ev[0] + eol)
		}
		b.WriteString("data: " + ev[1] + eol + eol)
	}
	return []byte(b.String())
}

func TestUsageOpenAIRealShapes(t *testing.T) {
	const ct = "text/event-stream; charset=utf-8"
	chunk := func(content string) [2]string {
		c, _ := json.Marshal(content)
		return [2]string{"", `{"id":"chatcmpl-B9","object":"chat.completion.chunk","created":1727,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":` + string(c) + `},"logprobs":null,"finish_reason":null}],"usage":null}`}
	}
	content := []string{"こんにちは", "、世界！", " Hello ", "안녕 🙂", `"usage": {"prompt_tokens": 999999}`}
	var evs [][2]string
	evs = append(evs, [2]string{"", `{"id":"chatcmpl-B9","object":"chat.completion.chunk","created":1727,"model":"gpt-4o","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}`})
	var all string
	for _, c := range content {
		evs = append(evs, chunk(c))
		all += c
	}
	final := [2]string{"", `{"id":"chatcmpl-B9","object":"chat.completion.chunk","created":1727,"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":2006,"completion_tokens":300,"total_tokens":2306,"prompt_tokens_details":{"cached_tokens":1920,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":128,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}`}
	done := [2]string{"", "[DONE]"}
	n, cjk := countRunes([]byte(all))
	want := Usage{InputTokens: 2006, OutputTokens: 300, CacheReadTokens: 1920, Reported: true, StreamedChars: n, StreamedCJK: cjk}
	if cjk != 9 { // こんにちは、世界 minus the comma, and 안녕
		t.Fatalf("test text has %d CJK runes", cjk)
	}
	for _, eol := range []string{"\n", "\r\n", "\r"} {
		body := sse(eol, append(append(evs[:len(evs):len(evs)], final), done)...)
		checkAllSplits(t, DialectOpenAI, EndpointChat, ct, body, want)
	}

	// Without include_usage: text only, the injected text counted as text.
	body := sse("\n", append(evs[:len(evs):len(evs)], done)...)
	checkAllSplits(t, DialectOpenAI, EndpointChat, ct, body, Usage{StreamedChars: n, StreamedCJK: cjk})

	// Multi-line data fields are joined with \n; comments, id, retry and
	// a byte order mark are ignored.
	multi := "\xEF\xBB\xBF: keep-alive\n\nid: 1\nretry: 100\ndata: {\"choices\":[{\"delta\":\ndata: {\"content\":\"ab\"}}],\ndata: \"usage\":{\"prompt_tokens\":3,\ndata:\"completion_tokens\":4}}\n\ndata\n\ndata:[DONE]\n\n"
	for _, eol := range []string{"\n", "\r\n", "\r"} {
		checkAllSplits(t, DialectOpenAI, EndpointChat, "text/event-stream", []byte(strings.ReplaceAll(multi, "\n", eol)),
			Usage{InputTokens: 3, OutputTokens: 4, Reported: true, StreamedChars: 2})
	}
	// A BOM before the first data line.
	checkAllSplits(t, DialectOpenAI, EndpointChat, "text/event-stream",
		[]byte("\xEF\xBB\xBFdata: {\"usage\":{\"prompt_tokens\":3}}\n\n"), Usage{InputTokens: 3, Reported: true})

	// Legacy completions stream, several choices, and a non-stream chat
	// answer whose content mentions usage, JSON-escaped.
	comp := sse("\n",
		[2]string{"", `{"id":"cmpl-1","object":"text_completion","created":1,"choices":[{"text":"ab","index":0,"logprobs":null,"finish_reason":null},{"text":"çd","index":1}],"model":"gpt-3.5-turbo-instruct"}`},
		[2]string{"", `{"id":"cmpl-1","object":"text_completion","created":1,"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}`},
		[2]string{"", "[DONE]"})
	checkAllSplits(t, DialectOpenAI, EndpointCompletion, "text/event-stream", comp,
		Usage{InputTokens: 5, OutputTokens: 7, Reported: true, StreamedChars: 4})

	inj := []byte(`{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"\"usage\": {\"prompt_tokens\": 999999}","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}},"service_tier":"default","system_fingerprint":"fp_1"}` + "\n")
	checkAllSplits(t, DialectOpenAI, EndpointChat, "application/json", inj, Usage{InputTokens: 19, OutputTokens: 10, Reported: true})
	// The same with the usage object before the text, and a nested object
	// named usage at depth 2 that must be ignored.
	inj2 := []byte(`{"usage":{"prompt_tokens":19,"completion_tokens":10},"choices":[{"usage":{"prompt_tokens":5},"message":{"content":"{\"usage\":{\"prompt_tokens\":999999}} \\\"usage\\\": {"}}],"x":"\\"}`)
	checkAllSplits(t, DialectOpenAI, EndpointChat, "application/json", inj2, Usage{InputTokens: 19, OutputTokens: 10, Reported: true})

	// Reasoning and tool calls streamed by OpenAI-compatible servers.
	tools := sse("\n",
		[2]string{"", `{"choices":[{"delta":{"reasoning_content":"think","reasoning":"think"}}]}`},
		[2]string{"", `{"choices":[{"delta":{"reasoning":"more"}}]}`},
		[2]string{"", `{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c1","type":"function","function":{"name":"f","arguments":"{\"a\":"}}]}}]}`},
		[2]string{"", `{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"1}"}}]}}]}`},
	)
	checkAllSplits(t, DialectOpenAI, EndpointChat, "text/event-stream", tools, Usage{StreamedChars: 5 + 4 + 5 + 2})
}

func TestUsageResponsesRealShapes(t *testing.T) {
	resp := func(status, usage string) string {
		return `{"id":"resp_1","object":"response","created_at":1741,"status":"` + status + `","model":"gpt-4.1","output":[],"usage":` + usage + `}`
	}
	body := sse("\n",
		[2]string{"response.created", `{"type":"response.created","sequence_number":0,"response":` + resp("in_progress", "null") + `}`},
		[2]string{"response.in_progress", `{"type":"response.in_progress","sequence_number":1,"response":` + resp("in_progress", "null") + `}`},
		[2]string{"response.output_item.added", `{"type":"response.output_item.added","sequence_number":2,"output_index":0,"item":{"id":"msg_1","type":"message","status":"in_progress","content":[],"role":"assistant"}}`},
		[2]string{"response.output_text.delta", `{"type":"response.output_text.delta","sequence_number":3,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hi 世界"}`},
		[2]string{"response.output_text.delta", `{"type":"response.output_text.delta","sequence_number":4,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"!"}`},
		[2]string{"response.output_text.done", `{"type":"response.output_text.done","sequence_number":5,"item_id":"msg_1","output_index":0,"content_index":0,"text":"Hi 世界!"}`},
		[2]string{"response.function_call_arguments.delta", `{"type":"response.function_call_arguments.delta","sequence_number":6,"item_id":"fc_1","output_index":1,"delta":"{}"}`},
		[2]string{"response.completed", `{"type":"response.completed","sequence_number":7,"response":{"id":"resp_1","object":"response","status":"completed","output":[{"type":"message","content":[{"type":"output_text","text":"Hi 世界!"}]}],"usage":{"input_tokens":328,"input_tokens_details":{"cached_tokens":256},"output_tokens":52,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":380}}}`},
	)
	checkAllSplits(t, DialectOpenAI, EndpointResponses, "text/event-stream", body,
		Usage{InputTokens: 328, OutputTokens: 52, CacheReadTokens: 256, Reported: true, StreamedChars: 5 + 1 + 2, StreamedCJK: 2})

	doc := []byte(`{"id":"resp_1","object":"response","status":"completed","output":[{"type":"message","content":[{"type":"output_text","text":"usage"}]}],"usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},"output_tokens":87,"total_tokens":123}}`)
	checkAllSplits(t, DialectOpenAI, EndpointResponses, "application/json", doc, Usage{InputTokens: 36, OutputTokens: 87, Reported: true})

	// An incomplete response (max_output_tokens reached) reports usage too.
	inc := sse("\n", [2]string{"response.incomplete", `{"type":"response.incomplete","response":{"status":"incomplete","usage":{"input_tokens":3,"output_tokens":16}}}`})
	checkAllSplits(t, DialectOpenAI, EndpointResponses, "text/event-stream", inc, Usage{InputTokens: 3, OutputTokens: 16, Reported: true})
}

func TestUsageAnthropicRealShapes(t *testing.T) {
	body := sse("\n",
		[2]string{"message_start", `{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":472,"cache_creation_input_tokens":2048,"cache_read_input_tokens":1024,"cache_creation":{"ephemeral_5m_input_tokens":2048,"ephemeral_1h_input_tokens":0},"output_tokens":2,"service_tier":"standard"}}}`},
		[2]string{"content_block_start", `{"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":"","signature":""}}`},
		[2]string{"content_block_delta", `{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"hmm"}}`},
		[2]string{"content_block_delta", `{"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"}}`},
		[2]string{"content_block_stop", `{"type":"content_block_stop","index":0}`},
		[2]string{"ping", `{"type": "ping"}`},
		[2]string{"content_block_start", `{"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}`},
		[2]string{"content_block_delta", `{"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"日本語 ok"}}`},
		[2]string{"content_block_stop", `{"type":"content_block_stop","index":1}`},
		[2]string{"content_block_start", `{"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_1","name":"get_weather","input":{}}}`},
		[2]string{"content_block_delta", `{"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{\"location\": \"San"}}`},
		[2]string{"content_block_delta", `{"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":" Francisco\"}"}}`},
		[2]string{"content_block_stop", `{"type":"content_block_stop","index":2}`},
		[2]string{"message_delta", `{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"input_tokens":472,"cache_creation_input_tokens":2048,"cache_read_input_tokens":1024,"output_tokens":89}}`},
		[2]string{"message_stop", `{"type":"message_stop"}`},
	)
	pj := `{"location": "San Francisco"}`
	want := Usage{InputTokens: 472 + 2048 + 1024, OutputTokens: 89, CacheReadTokens: 1024, CacheWriteTokens: 2048, Reported: true,
		StreamedChars: 3 + 6 + int64(len(pj)), StreamedCJK: 3}
	checkAllSplits(t, DialectAnthropic, EndpointMessages, "text/event-stream", body, want)

	// A client gone after message_start and one delta: the input is
	// known, the output is message_start's placeholder.
	cut := bytes.Index(body, []byte("event: content_block_stop"))
	checkAllSplits(t, DialectAnthropic, EndpointMessages, "text/event-stream", body[:cut],
		Usage{InputTokens: 472 + 2048 + 1024, OutputTokens: 2, CacheReadTokens: 1024, CacheWriteTokens: 2048, Reported: true, StreamedChars: 3})

	// The older message_delta without input figures, and a larger input
	// in message_delta than in message_start: the maximum is kept.
	older := sse("\n",
		[2]string{"message_start", `{"type":"message_start","message":{"usage":{"input_tokens":25,"output_tokens":1}}}`},
		[2]string{"message_delta", `{"type":"message_delta","usage":{"input_tokens":30,"output_tokens":15}}`},
		[2]string{"message_delta", `{"type":"message_delta","usage":{"input_tokens":20,"output_tokens":16}}`})
	checkAllSplits(t, DialectAnthropic, EndpointMessages, "text/event-stream", older, Usage{InputTokens: 30, OutputTokens: 16, Reported: true})

	doc := []byte(`{"id":"msg_1","type":"message","role":"assistant","model":"claude-opus-4-1","content":[{"type":"text","text":"{\"usage\":{\"input_tokens\":999999}}"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":2095,"cache_creation_input_tokens":0,"cache_read_input_tokens":1800,"output_tokens":503,"server_tool_use":{"web_search_requests":0}}}`)
	checkAllSplits(t, DialectAnthropic, EndpointMessages, "application/json", doc,
		Usage{InputTokens: 2095 + 1800, OutputTokens: 503, CacheReadTokens: 1800, Reported: true})
}

func TestUsageGeminiRealShapes(t *testing.T) {
	chunk := func(text, usage string) string {
		return `{"candidates": [{"content": {"parts": [{"text": ` + text + `}],"role": "model"},"index": 0}],"usageMetadata": ` + usage + `,"modelVersion": "gemini-2.5-flash","responseId": "abc"}`
	}
	evs := [][2]string{
		{"", chunk(`"**Thinking**"`, `{"promptTokenCount": 9,"totalTokenCount": 120,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 9}],"thoughtsTokenCount": 111}`)},
		{"", `{"candidates": [{"content": {"parts": [{"text": "你好"},{"functionCall": {"name": "f","args": {"a": 1}}}],"role": "model"},"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 9,"candidatesTokenCount": 20,"totalTokenCount": 160,"cachedContentTokenCount": 4,"toolUsePromptTokenCount": 7,"thoughtsTokenCount": 124},"modelVersion": "gemini-2.5-flash"}`},
	}
	want := Usage{InputTokens: 9 + 7, OutputTokens: 20 + 124, CacheReadTokens: 4, Reported: true,
		StreamedChars: 12 + 2 + int64(len(`{"a":1}`)), StreamedCJK: 2}
	checkAllSplits(t, DialectGemini, EndpointStreamGenerate, "text/event-stream", sse("\r\n", evs...), want)

	// The same chunks as a JSON array, as sent without alt=sse.
	arr := "[" + evs[0][1] + "\r\n,\r\n" + evs[1][1] + "\r\n]"
	checkAllSplits(t, DialectGemini, EndpointStreamGenerate, "application/json; charset=UTF-8", []byte(arr), want)

	// Non-stream: usageMetadata of the document; text is not counted.
	doc := strings.Replace(evs[1][1], `"你好"`, `"usageMetadata: {\"promptTokenCount\": 99}"`, 1)
	want.StreamedChars, want.StreamedCJK = 0, 0
	checkAllSplits(t, DialectGemini, EndpointGenerate, "application/json", []byte(doc), want)

	// proto3 JSON may quote integers.
	q := `{"usageMetadata":{"promptTokenCount":"12","candidatesTokenCount":"3"}}`
	checkAllSplits(t, DialectGemini, EndpointGenerate, "application/json", []byte(q), Usage{InputTokens: 12, OutputTokens: 3, Reported: true})
}

func TestUsageOllamaRealShapes(t *testing.T) {
	lines := `{"model":"qwen3","created_at":"2025-01-01T00:00:00Z","message":{"role":"assistant","content":"","thinking":"Let me"},"done":false}
{"model":"qwen3","created_at":"2025-01-01T00:00:00Z","message":{"role":"assistant","content":"中文"},"done":false}
{"model":"qwen3","created_at":"2025-01-01T00:00:00Z","message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"f","arguments":{"city":"Paris"}}}]},"done":false}
{"model":"qwen3","created_at":"2025-01-01T00:00:00Z","message":{"role":"assistant","content":""},"done_reason":"stop","done":true,"total_duration":4883583458,"load_duration":1334875,"prompt_eval_count":26,"prompt_eval_duration":342546000,"eval_count":282,"eval_duration":4535599000}
`
	want := Usage{InputTokens: 26, OutputTokens: 282, Reported: true, StreamedChars: 6 + 2 + int64(len(`{"city":"Paris"}`)), StreamedCJK: 2}
	checkAllSplits(t, DialectOllama, EndpointChat, "application/x-ndjson", []byte(lines), want)
	// CRLF lines, and a last line without its newline.
	crlf := strings.ReplaceAll(strings.TrimSuffix(lines, "\n"), "\n", "\r\n")
	checkAllSplits(t, DialectOllama, EndpointChat, "application/x-ndjson", []byte(crlf), want)

	gen := `{"model":"llama3.2","created_at":"2023-08-04T19:22:45.499127Z","response":"The sky is blue","done":true,"context":[1,2,3],"total_duration":10706818083,"load_duration":6338219291,"prompt_eval_count":26,"prompt_eval_duration":130079000,"eval_count":259,"eval_duration":4232710000}`
	checkAllSplits(t, DialectOllama, EndpointGenerate, "application/json; charset=utf-8", []byte(gen), Usage{InputTokens: 26, OutputTokens: 259, Reported: true})
	// Counts split across chunks inside the digits, followed by space.
	spaced := `{ "response" : "eval_count: 5" , "prompt_eval_count" : 123456789 , "eval_count" : 42 }`
	checkAllSplits(t, DialectOllama, EndpointGenerate, "application/json", []byte(spaced), Usage{InputTokens: 123456789, OutputTokens: 42, Reported: true})
}

// bigEmbeddings is an OpenAI embeddings response of about size bytes,
// usage last, as OpenAI sends it.
func bigEmbeddings(size int) []byte {
	var b bytes.Buffer
	b.WriteString(`{"object":"list","data":[`)
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; b.Len() < size; i++ {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"object":"embedding","index":%d,"embedding":[`, i)
		for k := 0; k < 1536; k++ {
			if k > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, "%.10f", r.Float64()*2-1)
		}
		b.WriteString("]}")
	}
	b.WriteString(`],"model":"text-embedding-3-small","usage":{"prompt_tokens":8123,"total_tokens":8123}}` + "\n")
	return b.Bytes()
}

func TestUsageHugeEmbeddings(t *testing.T) {
	body := bigEmbeddings(3 << 20)
	if !json.Valid(body) {
		t.Fatal("invalid test body")
	}
	want := Usage{InputTokens: 8123, Reported: true}
	checkAllSplits(t, DialectOpenAI, EndpointEmbedding, "application/json", body, want)

	// base64 vectors: long strings.
	var b strings.Builder
	b.WriteString(`{"object":"list","data":[`)
	for i := range 40 {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(`{"object":"embedding","index":0,"embedding":"` + strings.Repeat("AAAAPwAAgL8=", 10000) + `"}`)
	}
	b.WriteString(`],"model":"m","usage":{"prompt_tokens":5,"total_tokens":5}}`)
	checkAllSplits(t, DialectAzure, EndpointEmbedding, "application/json", []byte(b.String()), Usage{InputTokens: 5, Reported: true})

	// Only a total (some OpenAI-compatible servers).
	checkAllSplits(t, DialectOpenAI, EndpointEmbedding, "application/json", []byte(`{"data":[],"usage":{"total_tokens":9}}`), Usage{InputTokens: 9, Reported: true})
}

func TestUsageOversizedValues(t *testing.T) {
	big := strings.Repeat("x", maxUnitLen)
	// An SSE event beyond the buffer: its usage is still captured, its
	// text is not counted.
	ev := `{"choices":[{"delta":{"content":"` + big + `"}}],"usage":{"prompt_tokens":7,"completion_tokens":8}}`
	body := sse("\n", [2]string{"", `{"choices":[{"delta":{"content":"ab"}}]}`}, [2]string{"", ev}, [2]string{"", "[DONE]"})
	checkAllSplits(t, DialectOpenAI, EndpointChat, "text/event-stream", body, Usage{InputTokens: 7, OutputTokens: 8, Reported: true, StreamedChars: 2})

	// A Gemini array element with a large inline image.
	img := `{"candidates":[{"content":{"parts":[{"inlineData":{"mimeType":"image/png","data":"` + big + `"}}]}}],"usageMetadata":{"promptTokenCount":10,"candidatesTokenCount":1290}}`
	arr := `[{"candidates":[{"content":{"parts":[{"text":"ok"}]}}],"usageMetadata":{"promptTokenCount":10}},` + img + `]`
	checkAllSplits(t, DialectGemini, EndpointStreamGenerate, "application/json", []byte(arr), Usage{InputTokens: 10, OutputTokens: 1290, Reported: true, StreamedChars: 2})

	// An Ollama line beyond the buffer.
	line := `{"message":{"content":"` + big + `"},"prompt_eval_count":3,"eval_count":4}` + "\n"
	checkAllSplits(t, DialectOllama, EndpointChat, "application/x-ndjson", []byte(line), Usage{InputTokens: 3, OutputTokens: 4, Reported: true})

	// A usage object beyond the capture bound is dropped, not buffered.
	pad := `{"usage":{"prompt_tokens":1,"pad":"` + strings.Repeat("y", maxCaptureLen) + `"}}`
	checkAllSplits(t, DialectOpenAI, EndpointChat, "application/json", []byte(pad), Usage{})

	// Memory stays bounded whatever arrives.
	var s UsageScanner
	for _, ct := range []string{"text/event-stream", "application/x-ndjson", "application/json"} {
		s.Reset(DialectAnthropic, EndpointMessages, ct)
		prefix := `{"usage":`
		if ct == "text/event-stream" {
			prefix = "data: " + prefix
		}
		_, _ = s.Write([]byte(prefix))
		for range 40 {
			_, _ = s.Write([]byte(strings.Repeat(`{"usage":[`, 25000)))
		}
		if cap(s.unit) > maxUnitLen || cap(s.js.capBuf) > 2*maxCaptureLen {
			t.Errorf("%s: buffers grew to %d and %d", ct, cap(s.unit), cap(s.js.capBuf))
		}
		_ = s.Usage()
	}
}

func TestUsageMalformed(t *testing.T) {
	cases := []struct {
		d    Dialect
		ct   string
		body string
		want Usage
	}{
		{DialectOpenAI, "application/json", ``, Usage{}},
		{DialectOpenAI, "text/event-stream", ``, Usage{}},
		{DialectOllama, "application/x-ndjson", ``, Usage{}},
		{DialectOpenAI, "text/html; charset=utf-8", `<html><body><h1>502 Bad Gateway</h1><pre>{"usage":{"prompt_tokens":5}}</pre></body></html>`, Usage{}},
		{DialectOpenAI, "", `<html>{"usage":{"prompt_tokens":5}}</html>`, Usage{}},
		{DialectOpenAI, "application/json", `{"error":{"message":"Rate limit reached","type":"tokens","param":null,"code":"rate_limit_exceeded"}}`, Usage{}},
		{DialectOpenAI, "application/json", `{"usage":{"prompt_tokens":"5","completion_tokens":-3,"total_tokens":1.5}}`, Usage{}},
		{DialectOpenAI, "application/json", `{"usage":{"prompt_tokens":1e13,"completion_tokens":2.0,"prompt_tokens_details":{"cached_tokens":99999999999999999999999}}}`,
			Usage{InputTokens: maxUsageTokens, OutputTokens: 2, CacheReadTokens: maxUsageTokens, Reported: true}},
		{DialectOpenAI, "application/json", `{"usage":null,"usage":{"prompt_tokens":4},"usage":[1]}`, Usage{InputTokens: 4, Reported: true}},
		{DialectOpenAI, "application/json", `{"us\u0061ge":{"prompt_tokens":4}}`, Usage{}},
		{DialectOpenAI, "text/event-stream", "data: {\"usage\":{\"prompt_tokens\":4}\n\ndata: {\"usage\":{\"prompt_tokens\":NaN}}\n\n", Usage{}},
		{DialectOpenAI, "text/event-stream", "data: " + strings.Repeat("[", 300) + "\n\n", Usage{}},
		{DialectAnthropic, "application/json", `{"usage":{"input_tokens":true,"output_tokens":null,"cache_read_input_tokens":{}}}`, Usage{}},
		{DialectOllama, "application/json", `{"prompt_eval_count":"26","eval_count":-1}`, Usage{}},
		{DialectOllama, "application/json", `{"prompt_eval_count":1-2,"eval_count":0}`, Usage{Reported: true}},
		{DialectGemini, "application/json", `]]]}}}{"usageMetadata":{"promptTokenCount":3}}`, Usage{}},
		{DialectGemini, "application/json", `[1,"[{",{"usageMetadata":{"promptTokenCount":3}},[{"usageMetadata":{"promptTokenCount":9}}]]`, Usage{InputTokens: 3, Reported: true}},
		// A stream cut inside a value: nothing is made up.
		{DialectOllama, "application/x-ndjson", `{"prompt_eval_count":3,"eval_count":4`, Usage{}},
		{DialectOpenAI, "text/event-stream", `data: {"usage":{"prompt_tokens":3}}`, Usage{InputTokens: 3, Reported: true}},
		{DialectUnknown, "application/vnd.api+json", `{"usage":{"prompt_tokens":3}}`, Usage{InputTokens: 3, Reported: true}},
	}
	for i, tc := range cases {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			checkAllSplits(t, tc.d, EndpointChat, tc.ct, []byte(tc.body), tc.want)
		})
	}
	// Deeply nested garbage costs neither much time nor much memory.
	var s UsageScanner
	for _, ev := range []string{
		"data: {\"a\":" + strings.Repeat("[", 1000) + strings.Repeat("x", 200<<10) + "\n\n",
		"data: {\"a\":" + strings.Repeat("[", 300) + "x\n\n",
		"data: {\"a\":" + strings.Repeat("[", 15) + "x\n\n",
	} {
		s.Reset(DialectOpenAI, EndpointChat, "text/event-stream")
		b := []byte(ev)
		_, _ = s.Write(b)
		var m0, m1 runtime.MemStats
		runtime.ReadMemStats(&m0)
		for range 10 {
			_, _ = s.Write(b)
		}
		runtime.ReadMemStats(&m1)
		if perWrite := (m1.TotalAlloc - m0.TotalAlloc) / 10; perWrite > 32<<10 {
			t.Errorf("%d-byte nested event: %d bytes allocated", len(ev), perWrite)
		}
	}

	var zero UsageScanner
	_, _ = zero.Write([]byte(`{"usage":{"prompt_tokens":3}}`))
	if u := zero.Usage(); u != (Usage{}) {
		t.Errorf("zero scanner: %+v", u)
	}
}

func TestFrameOf(t *testing.T) {
	for ct, want := range map[string]framing{
		"text/event-stream":                 frameSSE,
		"Text/Event-Stream; charset=utf-8":  frameSSE,
		"application/x-ndjson":              frameNDJSON,
		"application/jsonl":                 frameNDJSON,
		"application/json":                  frameJSON,
		" application/json ; charset=UTF-8": frameJSON,
		"application/problem+json":          frameJSON,
		"":                                  frameJSON,
		"text/html":                         frameNone,
		"text/plain":                        frameNone,
		"json":                              frameNone,
	} {
		if got := frameOf(ct); got != want {
			t.Errorf("frameOf(%q) = %v, want %v", ct, got, want)
		}
	}
}

// openAIStream200 is a 200-event chat stream with usage, as OpenAI sends
// it, one event per write.
func openAIStream200() [][]byte {
	var evs [][]byte
	for i := range 200 {
		evs = append(evs, []byte(fmt.Sprintf(`data: {"id":"chatcmpl-AbCdEf123","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_abc123","choices":[{"index":0,"delta":{"content":" token%d"},"logprobs":null,"finish_reason":null}],"usage":null}`+"\n\n", i)))
	}
	evs = append(evs, []byte(`data: {"id":"chatcmpl-AbCdEf123","object":"chat.completion.chunk","created":1727000000,"model":"gpt-4o-2024-08-06","choices":[],"usage":{"prompt_tokens":1000,"completion_tokens":200,"total_tokens":1200,"prompt_tokens_details":{"cached_tokens":0}}}`+"\n\n"))
	evs = append(evs, []byte("data: [DONE]\n\n"))
	return evs
}

func TestUsageSteadyStateAllocs(t *testing.T) {
	evs := openAIStream200()
	var s UsageScanner
	run := func() Usage {
		s.Reset(DialectOpenAI, EndpointChat, "text/event-stream")
		for _, ev := range evs {
			_, _ = s.Write(ev)
		}
		return s.Usage()
	}
	if u := run(); u.InputTokens != 1000 || u.OutputTokens != 200 || u.StreamedChars < 1000 {
		t.Fatalf("unexpected %+v", u)
	}
	if a := testing.AllocsPerRun(20, func() { run() }); a > 0 {
		t.Errorf("%v allocs per stream", a)
	}
	body := bigEmbeddings(1 << 20)
	if a := testing.AllocsPerRun(5, func() {
		s.Reset(DialectOpenAI, EndpointEmbedding, "application/json")
		_, _ = s.Write(body)
		_ = s.Usage()
	}); a > 0 {
		t.Errorf("%v allocs per embeddings document", a)
	}
}

func BenchmarkUsageScannerOpenAIStream(b *testing.B) {
	evs := openAIStream200()
	n := 0
	for _, ev := range evs {
		n += len(ev)
	}
	var s UsageScanner
	b.SetBytes(int64(n))
	b.ReportAllocs()
	for b.Loop() {
		s.Reset(DialectOpenAI, EndpointChat, "text/event-stream")
		for _, ev := range evs {
			_, _ = s.Write(ev)
		}
		if s.Usage().OutputTokens != 200 {
			b.Fatal("usage not found")
		}
	}
}

func BenchmarkUsageScannerEmbeddings1MB(b *testing.B) {
	body := bigEmbeddings(1 << 20)
	var s UsageScanner
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		s.Reset(DialectOpenAI, EndpointEmbedding, "application/json")
		for p := body; len(p) > 0; {
			n := min(len(p), 32<<10) // a proxy's copy buffer
			_, _ = s.Write(p[:n])
			p = p[n:]
		}
		if s.Usage().InputTokens != 8123 {
			b.Fatal("usage not found")
		}
	}
}
