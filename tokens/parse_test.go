package tokens

import (
	"errors"
	"strings"
	"testing"
	"unicode/utf8"
)

// parsePath routes path and parses body the way the module does.
func parsePath(t *testing.T, path, body string) (Request, error) {
	t.Helper()
	d, ep, m := Route("POST", path)
	if d == DialectUnknown {
		t.Fatalf("Route(%q) is unknown", path)
	}
	p := GetParser()
	defer PutParser(p)
	var req Request
	err := p.Parse(d, ep, m, []byte(body), &req)
	return req, err
}

type parseCase struct {
	name, path, body string
	want             Request // Dialect and Endpoint are filled in from path
}

func runParseCases(t *testing.T, cases []parseCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parsePath(t, tc.path, tc.body)
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			want := tc.want
			want.Dialect, want.Endpoint, _ = Route("POST", tc.path)
			if want.Choices == 0 {
				want.Choices = 1
			}
			if got != want {
				t.Errorf("got  %+v\nwant %+v", got, want)
			}
		})
	}
}

const pngB64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="

func TestParseOpenAI(t *testing.T) {
	runParseCases(t, []parseCase{
		{
			name: "chat full",
			path: "/v1/chat/completions",
			body: `{"model":"gpt-4o","messages":[
				{"role":"system","content":"Be brief."},
				{"role":"user","content":[{"type":"text","text":"What is this?"},
					{"type":"image_url","image_url":{"url":"data:image/png;base64,` + pngB64 + `"}},
					{"type":"input_audio","input_audio":{"data":"` + pngB64 + `","format":"wav"}}]},
				{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},
				{"role":"tool","tool_call_id":"c1","content":"ok"}],
				"stream":true,"max_tokens":100,"max_completion_tokens":200,"n":2}`,
			want: Request{Model: "gpt-4o", Stream: true, MaxOutputTokens: 200, Choices: 2, PromptChars: 9 + 13 + 7 + 2},
		},
		{
			name: "chat defaults",
			path: "/v1/chat/completions",
			body: `{"model":"m","messages":[{"role":"user","content":"hi"}]}`,
			want: Request{Model: "m", PromptChars: 2},
		},
		{
			name: "max_tokens only, nulls",
			path: "/v1/chat/completions",
			body: `{"model":"m","stream":null,"max_tokens":77,"max_completion_tokens":null,"n":null,"messages":[]}`,
			want: Request{Model: "m", MaxOutputTokens: 77},
		},
		{
			name: "CJK prompt",
			path: "/v1/chat/completions",
			body: `{"model":"qwen","messages":[{"role":"user","content":"你好，世界！こんにちは 안녕"}]}`,
			want: Request{Model: "qwen", PromptChars: 14, PromptCJK: 11},
		},
		{
			name: "escaped text is counted decoded",
			path: "/v1/chat/completions",
			body: `{"model":"m","messages":[{"role":"user","content":"\u4e2d\n\"x\""}]}`,
			want: Request{Model: "m", PromptChars: 5, PromptCJK: 1},
		},
		{
			name: "duplicate keys: last wins",
			path: "/v1/chat/completions",
			body: `{"model":"cheap","max_tokens":1,"model":"expensive","max_tokens":1000,"stream":true,"stream":false}`,
			want: Request{Model: "expensive", MaxOutputTokens: 1000},
		},
		{
			name: "escaped key is decoded",
			path: "/v1/chat/completions",
			body: `{"mod\u0065l":"m","max_\u0074okens":50}`,
			want: Request{Model: "m", MaxOutputTokens: 50},
		},
		{
			name: "integral floats",
			path: "/v1/chat/completions",
			body: `{"max_tokens":1e3,"n":2.0}`,
			want: Request{MaxOutputTokens: 1000, Choices: 2},
		},
		{
			name: "max int64",
			path: "/v1/chat/completions",
			body: `{"max_tokens":9223372036854775807}`,
			want: Request{MaxOutputTokens: 9223372036854775807},
		},
		{
			name: "n zero means one, negative zero is zero",
			path: "/v1/chat/completions",
			body: `{"n":0,"max_tokens":-0}`,
			want: Request{},
		},
		{
			name: "unknown fields and odd content shapes are ignored",
			path: "/v1/chat/completions",
			body: `{"model":"m","temperature":0.7,"tools":[{"type":"function"}],"messages":[{"role":"user","content":{"weird":true}},"x",5,{"role":"user","content":[{"type":"text","text":5},"y",{"type":"text","text":"ok"}]}]}`,
			want: Request{Model: "m", PromptChars: 2},
		},
		{
			name: "completions",
			path: "/v1/completions",
			body: `{"model":"davinci","prompt":["abc","de"],"suffix":"f","max_tokens":16,"n":2,"best_of":3,"stream":true}`,
			want: Request{Model: "davinci", Stream: true, MaxOutputTokens: 16, Choices: 3, PromptChars: 6},
		},
		{
			name: "completions token ids",
			path: "/v1/completions",
			body: `{"model":"m","prompt":[[1,2,3],[4]]}`,
			want: Request{Model: "m", PromptChars: 16},
		},
		{
			name: "embeddings string array",
			path: "/v1/embeddings",
			body: `{"model":"text-embedding-3-small","input":["hello","world!"],"stream":"ignored","max_tokens":"ignored"}`,
			want: Request{Model: "text-embedding-3-small", PromptChars: 11},
		},
		{
			name: "embeddings token ids",
			path: "/v1/embeddings",
			body: `{"model":"e","input":[101,102,103]}`,
			want: Request{Model: "e", PromptChars: 12},
		},
		{
			name: "embeddings string",
			path: "/v1/embeddings",
			body: `{"model":"e","input":"日本"}`,
			want: Request{Model: "e", PromptChars: 2, PromptCJK: 2},
		},
		{
			name: "responses string input",
			path: "/v1/responses",
			body: `{"model":"gpt-4.1","instructions":"Be nice.","input":"Hello","max_output_tokens":500,"max_tokens":9,"stream":true}`,
			want: Request{Model: "gpt-4.1", Stream: true, MaxOutputTokens: 500, PromptChars: 8 + 5},
		},
		{
			name: "responses item input",
			path: "/v1/responses",
			body: `{"model":"o3","input":[
				{"role":"user","content":[{"type":"input_text","text":"abc"},{"type":"input_image","image_url":"data:image/png;base64,` + pngB64 + `"}]},
				{"role":"assistant","content":"de"},
				{"type":"function_call","call_id":"c","name":"f","arguments":"{}"},
				{"type":"function_call_output","call_id":"c","output":"xyz"}]}`,
			want: Request{Model: "o3", PromptChars: 3 + 2 + 2 + 3},
		},
		{
			name: "azure takes the deployment",
			path: "/openai/deployments/prod-gpt4/chat/completions",
			body: `{"model":5,"messages":[{"role":"user","content":"hey"}],"max_completion_tokens":10}`,
			want: Request{Model: "prod-gpt4", MaxOutputTokens: 10, PromptChars: 3},
		},
		{
			name: "invalid UTF-8 model",
			path: "/v1/chat/completions",
			body: "{\"model\":\"gpt\xff4\"}",
			want: Request{Model: "gpt\uFFFD4"},
		},
		{
			name: "long model truncated",
			path: "/v1/chat/completions",
			body: `{"model":"` + strings.Repeat("a", 300) + `"}`,
			want: Request{Model: strings.Repeat("a", MaxModelLen)},
		},
		{
			name: "long model truncated at a rune boundary",
			path: "/v1/chat/completions",
			body: `{"model":"a` + strings.Repeat("é", 200) + `"}`,
			want: Request{Model: "a" + strings.Repeat("é", 127)},
		},
	})
}

func TestParseAnthropic(t *testing.T) {
	runParseCases(t, []parseCase{
		{
			name: "full",
			path: "/v1/messages",
			body: `{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":true,
				"system":[{"type":"text","text":"You are terse.","cache_control":{"type":"ephemeral"}}],
				"messages":[
					{"role":"user","content":[
						{"type":"image","source":{"type":"base64","media_type":"image/png","data":"` + pngB64 + `"}},
						{"type":"document","source":{"type":"base64","media_type":"application/pdf","data":"` + pngB64 + `"}},
						{"type":"document","source":{"type":"text","media_type":"text/plain","data":"doc"}},
						{"type":"text","text":"Describe."}]},
					{"role":"assistant","content":[{"type":"text","text":"ok"},{"type":"tool_use","id":"t","name":"s","input":{"q":"x"}}]},
					{"role":"user","content":[
						{"type":"tool_result","tool_use_id":"t","content":"found"},
						{"type":"tool_result","tool_use_id":"t","content":[{"type":"text","text":"more"},{"type":"image","source":{"type":"base64","data":"` + pngB64 + `"}}]}]}]}`,
			want: Request{Model: "claude-sonnet-4-5", Stream: true, MaxOutputTokens: 1024,
				PromptChars: 14 + 3 + 9 + 2 + int64(len(`{"q":"x"}`)) + 5 + 4},
		},
		{
			name: "string system and content, no stream",
			path: "/v1/messages",
			body: `{"model":"claude-haiku","max_tokens":10,"system":"sys","messages":[{"role":"user","content":"한국어"}]}`,
			want: Request{Model: "claude-haiku", MaxOutputTokens: 10, PromptChars: 6, PromptCJK: 3},
		},
	})
}

func TestParseGemini(t *testing.T) {
	runParseCases(t, []parseCase{
		{
			name: "generate",
			path: "/v1beta/models/gemini-2.0-flash:generateContent",
			body: `{"contents":[{"role":"user","parts":[{"text":"Hello"},{"inlineData":{"mimeType":"image/png","data":"` + pngB64 + `"}}]},
				{"role":"model","parts":[{"functionCall":{"name":"f","args":{"a":1}}}]},
				{"role":"user","parts":[{"functionResponse":{"name":"f","response":{"r":2}}}]}],
				"systemInstruction":{"parts":[{"text":"Sys"}]},
				"generationConfig":{"maxOutputTokens":256,"candidateCount":2,"temperature":0.5},
				"stream":false}`,
			want: Request{Model: "gemini-2.0-flash", MaxOutputTokens: 256, Choices: 2, PromptChars: 5 + 7 + 7 + 3},
		},
		{
			name: "stream by path, snake_case, quoted integers",
			path: "/v1/projects/p/locations/l/publishers/google/models/gemini-2.5-pro:streamGenerateContent",
			body: `{"model":"ignored","contents":[{"parts":[{"text":"中文"}]}],"system_instruction":{"parts":[{"text":"x"}]},"generation_config":{"max_output_tokens":"64","candidate_count":"1"}}`,
			want: Request{Model: "gemini-2.5-pro", Stream: true, MaxOutputTokens: 64, PromptChars: 3, PromptCJK: 2},
		},
		{
			name: "null config",
			path: "/v1beta/models/g:generateContent",
			body: `{"contents":[],"generationConfig":null}`,
			want: Request{Model: "g"},
		},
	})
}

func TestParseOllama(t *testing.T) {
	runParseCases(t, []parseCase{
		{
			name: "chat streams by default",
			path: "/api/chat",
			body: `{"model":"llama3.2","messages":[{"role":"user","content":"why is the sky blue?","images":["` + pngB64 + `"]},
				{"role":"assistant","content":"","tool_calls":[{"function":{"name":"w","arguments":{"c":"P"}}}]}],
				"options":{"num_predict":128,"temperature":0}}`,
			want: Request{Model: "llama3.2", Stream: true, MaxOutputTokens: 128, PromptChars: 20 + int64(len(`{"c":"P"}`))},
		},
		{
			name: "chat stream false, num_predict -1",
			path: "/api/chat",
			body: `{"model":"m","stream":false,"options":{"num_predict":-1}}`,
			want: Request{Model: "m"},
		},
		{
			name: "stream null is unset, so it streams",
			path: "/api/chat",
			body: `{"model":"m","stream":null}`,
			want: Request{Model: "m", Stream: true},
		},
		{
			name: "generate",
			path: "/api/generate",
			body: `{"model":"qwen2.5","prompt":"abc","system":"de","suffix":"f","context":[1,2,3],"images":["` + pngB64 + `"],"stream":true,"options":{"num_predict":-2}}`,
			want: Request{Model: "qwen2.5", Stream: true, PromptChars: 6 + 12},
		},
		{
			name: "embed never streams",
			path: "/api/embed",
			body: `{"model":"nomic","input":["ab","c"],"stream":true,"options":"ignored"}`,
			want: Request{Model: "nomic", PromptChars: 3},
		},
		{
			name: "legacy embeddings",
			path: "/api/embeddings",
			body: `{"model":"nomic","prompt":"abcd"}`,
			want: Request{Model: "nomic", PromptChars: 4},
		},
	})
}

func TestParseUnknownDialect(t *testing.T) {
	p := GetParser()
	defer PutParser(p)
	var req Request
	if err := p.Parse(DialectUnknown, EndpointUnknown, "", []byte(`{"model":"x","stream":true,"max_tokens":5,"n":3,"messages":[{"content":"abc"}]}`), &req); err != nil {
		t.Fatal(err)
	}
	want := Request{Model: "x", Stream: true, MaxOutputTokens: 5, Choices: 3}
	if req != want {
		t.Fatalf("got %+v, want %+v", req, want)
	}
}

func TestParseErrors(t *testing.T) {
	deep := `{"a":` + strings.Repeat("[", 100000) + strings.Repeat("]", 100000) + `}`
	deepObj := strings.Repeat(`{"a":`, 100000) + "1" + strings.Repeat("}", 100000)
	tests := []struct {
		name, path, body, msg string
	}{
		{"empty", "/v1/chat/completions", ``, "not valid JSON"},
		{"whitespace", "/v1/chat/completions", " \n\t", "not valid JSON"},
		{"malformed", "/v1/chat/completions", `{"model":}`, "not valid JSON"},
		{"truncated", "/v1/chat/completions", `{"model":"gpt-4o","messages":[{"role":"user","content":"hel`, "not valid JSON"},
		{"truncated after value", "/v1/chat/completions", `{"model":"gpt-4o"`, "not valid JSON"},
		{"trailing comma", "/v1/chat/completions", `{"model":"m",}`, "not valid JSON"},
		{"trailing data", "/v1/chat/completions", `{} x`, "not valid JSON"},
		{"two objects", "/v1/chat/completions", `{}{}`, "not valid JSON"},
		{"single quotes", "/v1/chat/completions", `{'model':'m'}`, "not valid JSON"},
		{"NaN", "/v1/chat/completions", `{"max_tokens":NaN}`, "not valid JSON"},
		{"leading zero", "/v1/chat/completions", `{"max_tokens":012}`, "not valid JSON"},
		{"plus sign", "/v1/chat/completions", `{"max_tokens":+1}`, "not valid JSON"},
		{"bare minus", "/v1/chat/completions", `{"max_tokens":-}`, "not valid JSON"},
		{"raw control char", "/v1/chat/completions", "{\"model\":\"a\x01b\"}", "not valid JSON"},
		{"bad escape", "/v1/chat/completions", `{"model":"a\x"}`, "not valid JSON"},
		{"short unicode escape", "/v1/chat/completions", `{"model":"\u12"}`, "not valid JSON"},
		{"bad literal", "/v1/chat/completions", `{"stream":tru}`, "not valid JSON"},
		{"BOM", "/v1/chat/completions", "\xef\xbb\xbf{}", "not valid JSON"},
		{"deep arrays", "/v1/chat/completions", deep, "nested more than"},
		{"deep objects", "/v1/messages", deepObj, "nested more than"},
		{"array", "/v1/chat/completions", `[{"model":"m"}]`, "must be a JSON object"},
		{"string", "/v1/chat/completions", `"model"`, "must be a JSON object"},
		{"number", "/v1/chat/completions", `42`, "must be a JSON object"},
		{"null", "/v1/chat/completions", `null`, "must be a JSON object"},
		{"model number", "/v1/chat/completions", `{"model":5}`, `"model" must be a string`},
		{"model object", "/v1/messages", `{"model":{}}`, `"model" must be a string`},
		{"max_tokens string", "/v1/chat/completions", `{"max_tokens":"x"}`, `"max_tokens" must be an integer`},
		{"max_tokens fraction", "/v1/chat/completions", `{"max_tokens":1.5}`, `"max_tokens" must be an integer`},
		{"max_tokens tiny exponent", "/v1/chat/completions", `{"max_tokens":1e-999999999999}`, `"max_tokens" must be an integer`},
		{"max_tokens negative", "/v1/chat/completions", `{"max_tokens":-1}`, `"max_tokens" must not be negative`},
		{"max_tokens > int64", "/v1/chat/completions", `{"max_tokens":9223372036854775808}`, `"max_tokens" is too large`},
		{"max_tokens huge", "/v1/chat/completions", `{"max_tokens":1e30}`, `"max_tokens" is too large`},
		{"max_tokens absurd exponent", "/v1/chat/completions", `{"max_tokens":1e99999999999999999999}`, `"max_tokens" is too large`},
		{"max_tokens many digits", "/v1/chat/completions", `{"max_tokens":` + strings.Repeat("9", 400) + `}`, `"max_tokens" is too large`},
		{"max_completion_tokens bool", "/v1/chat/completions", `{"max_completion_tokens":true}`, `"max_completion_tokens" must be an integer`},
		{"n negative", "/v1/chat/completions", `{"n":-2}`, `"n" must not be negative`},
		{"stream string", "/v1/chat/completions", `{"stream":"true"}`, `"stream" must be a boolean`},
		{"stream number", "/api/chat", `{"stream":1}`, `"stream" must be a boolean`},
		{"responses max_output_tokens", "/v1/responses", `{"max_output_tokens":[]}`, `"max_output_tokens" must be an integer`},
		{"best_of", "/v1/completions", `{"best_of":"3"}`, `"best_of" must be an integer`},
		{"anthropic max_tokens", "/v1/messages", `{"max_tokens":{}}`, `"max_tokens" must be an integer`},
		{"gemini config type", "/v1beta/models/g:generateContent", `{"generationConfig":5}`, `"generationConfig" must be an object`},
		{"gemini bad quoted int", "/v1beta/models/g:generateContent", `{"generationConfig":{"maxOutputTokens":"x"}}`, `"generationConfig.maxOutputTokens" must be an integer`},
		{"gemini quoted fraction", "/v1beta/models/g:generateContent", `{"generationConfig":{"candidateCount":"1.5"}}`, `"generationConfig.candidateCount" must be an integer`},
		{"gemini negative", "/v1beta/models/g:generateContent", `{"generation_config":{"max_output_tokens":-5}}`, `"generationConfig.maxOutputTokens" must not be negative`},
		{"ollama options type", "/api/generate", `{"options":[]}`, `"options" must be an object`},
		{"ollama num_predict fraction", "/api/chat", `{"options":{"num_predict":1.5}}`, `"options.num_predict" must be an integer`},
		{"ollama num_predict string", "/api/chat", `{"options":{"num_predict":"5"}}`, `"options.num_predict" must be an integer`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parsePath(t, tt.path, tt.body)
			var pe *ParseError
			if !errors.As(err, &pe) {
				t.Fatalf("err = %v (%T), want *ParseError", err, err)
			}
			if !strings.Contains(pe.Error(), tt.msg) {
				t.Errorf("err = %q, want it to contain %q", pe.Error(), tt.msg)
			}
			if len(pe.Msg) > 120 {
				t.Errorf("error message is %d bytes long: %q", len(pe.Msg), pe.Msg)
			}
		})
	}
}

// TestParseErrorDoesNotEcho checks that error messages never reflect the
// body, whatever it contains.
func TestParseErrorDoesNotEcho(t *testing.T) {
	secret := "SECRET-" + strings.Repeat("x", 100)
	for _, body := range []string{
		`{"model":"` + secret + `",}`,
		`{"model":` + secret + `}`,
		`[` + secret + `]`,
		`{"messages":["` + secret + `"` + "\x01",
	} {
		_, err := parsePath(t, "/v1/chat/completions", body)
		if err == nil || strings.Contains(err.Error(), "SECRET") {
			t.Errorf("Parse(%.20q...) = %v", body, err)
		}
	}
}

func TestParseDepthLimit(t *testing.T) {
	// The root object is one level; maxDepth-1 arrays inside it is the most
	// that is accepted.
	ok := `{"a":` + strings.Repeat("[", maxDepth-1) + strings.Repeat("]", maxDepth-1) + `}`
	if _, err := parsePath(t, "/v1/chat/completions", ok); err != nil {
		t.Fatalf("depth %d: %v", maxDepth, err)
	}
	tooDeep := `{"a":` + strings.Repeat("[", maxDepth) + strings.Repeat("]", maxDepth) + `}`
	if _, err := parsePath(t, "/v1/chat/completions", tooDeep); err == nil {
		t.Fatalf("depth %d accepted", maxDepth+1)
	}
}

// TestParseResetsRequest checks that a reused Request carries nothing over.
func TestParseResetsRequest(t *testing.T) {
	p := GetParser()
	defer PutParser(p)
	req := Request{Model: "old", Stream: true, MaxOutputTokens: 9, Choices: 9, PromptChars: 9, PromptCJK: 9}
	if err := p.Parse(DialectOpenAI, EndpointChat, "", []byte(`{}`), &req); err != nil {
		t.Fatal(err)
	}
	if want := (Request{Dialect: DialectOpenAI, Endpoint: EndpointChat, Choices: 1}); req != want {
		t.Fatalf("got %+v, want %+v", req, want)
	}
}

func TestParseJSONInt(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		res  int
	}{
		{"0", 0, intOK}, {"-0", 0, intOK}, {"0.000", 0, intOK}, {"-0.0e-5", 0, intOK},
		{"7", 7, intOK}, {"120", 120, intOK}, {"1.0", 1, intOK}, {"1.50e1", 15, intOK},
		{"1E2", 100, intOK}, {"1e+2", 100, intOK}, {"12300e-2", 123, intOK}, {"0.5e1", 5, intOK},
		{"9223372036854775807", 1<<63 - 1, intOK}, {"9.223372036854775807e18", 1<<63 - 1, intOK},
		{"1.5", 0, intFraction}, {"1e-1", 0, intFraction}, {"-1.5", 0, intFraction},
		{"-1", 0, intNegative}, {"-1e3", 0, intNegative},
		{"9223372036854775808", 0, intRange}, {"10000000000000000000", 0, intRange},
		{"18446744073709551616", 0, intRange}, {"1e19", 0, intRange},
	}
	for _, tt := range tests {
		got, res := parseJSONInt([]byte(tt.in))
		if got != tt.want || res != tt.res {
			t.Errorf("parseJSONInt(%q) = %d, %d; want %d, %d", tt.in, got, res, tt.want, tt.res)
		}
	}
}

func TestCountRunes(t *testing.T) {
	tests := []struct {
		in       string
		n, cjk   int64
		checkLen bool
	}{
		{"", 0, 0, true},
		{"hello, world: a longer ASCII run", 32, 0, true},
		{"漢字かなカナ한글", 8, 8, true},
		{"㐀 豈 𠀀 𯨟 ᄀ", 9, 5, true},                                  // range edges: U+3400, U+F900, U+20000, U+2FA1F, U+1100
		{"Ω é ¿ ＡＢ — 😀", 12, 0, true},                              // non-CJK non-ASCII
		{"abcdefgh中abcdefgh", 17, 1, true},                         // CJK between fast-path words
		{"\xff\xfeab", 4, 0, false},                                // invalid bytes count one each
		{"\u3040\u30ff\u4dc0\ua000\uac00\ud7af\ud7b0", 7, 4, true}, // inclusive/exclusive edges
	}
	for _, tt := range tests {
		n, cjk := countRunes([]byte(tt.in))
		if n != tt.n || cjk != tt.cjk {
			t.Errorf("countRunes(%q) = %d, %d; want %d, %d", tt.in, n, cjk, tt.n, tt.cjk)
		}
		if tt.checkLen && n != int64(utf8.RuneCountInString(tt.in)) {
			t.Errorf("countRunes(%q) = %d, RuneCount = %d", tt.in, n, utf8.RuneCountInString(tt.in))
		}
	}
}

// TestValidateAgreesWithStdlib cross-checks the validator on small inputs
// against encoding/json's notion of validity.
func TestValidateAgreesWithStdlib(t *testing.T) {
	for _, s := range []string{
		`{}`, `[]`, `""`, `0`, `-0`, `1.5e+3`, `true`, `false`, `null`, ` {"a" : [1, 2, {"b": null}] } `,
		`"\u00e9\ud83d\ude00\/\b\f\n\r\t\\\""`, "\"\x7f\"", "\"\xff\"",
		`{`, `}`, `[1,]`, `[,1]`, `{"a"}`, `{"a":1,}`, `{1:2}`, `01`, `1.`, `.1`, `1e`, `1e+`, `-`, `--1`,
		`"\u00g0"`, `"\a"`, `[1 2]`, `{"a":1 "b":2}`, `tru`, `nul`, `falsey`, "\"\t\"", `[[[]]]`, `[[[]]`,
	} {
		_, perr := validateJSON([]byte(s))
		if got, want := perr == nil, jsonValid(s); got != want {
			t.Errorf("validateJSON(%q) valid = %v, encoding/json says %v", s, got, want)
		}
	}
}
