package tokens

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/tiktoken-go/tokenizer"
)

func TestEstimatorText(t *testing.T) {
	def := Estimator{}
	cases := []struct {
		name       string
		e          Estimator
		chars, cjk int64
		want       int64
	}{
		{"empty", def, 0, 0, 0},
		{"negative chars", def, -5, 0, 0},
		{"negative chars with cjk", def, -5, 3, 0},
		{"one rune costs one token", def, 1, 0, 1},
		{"four runes", def, 4, 0, 1},
		{"five runes round up", def, 5, 0, 2},
		{"eight runes", def, 8, 0, 2},
		{"all cjk", def, 3, 3, 3},
		{"mixed", def, 10, 2, 2 + 2},
		{"mixed rounds up the rest", def, 11, 2, 2 + 3},
		{"cjk above chars clamps to chars", def, 3, 10, 3},
		{"negative cjk counts as none", def, 8, -5, 2},
		{"chars per token 2", Estimator{CharsPerToken: 2}, 5, 0, 3},
		{"chars per token 2.5", Estimator{CharsPerToken: 2.5}, 10, 0, 4},
		{"chars per token 1", Estimator{CharsPerToken: 1}, 7, 3, 7},
		{"chars per token only for non-cjk", Estimator{CharsPerToken: 100}, 103, 3, 3 + 1},
		{"negative chars per token is default", Estimator{CharsPerToken: -1}, 8, 0, 2},
		{"completion tokens do not matter", Estimator{CompletionTokens: 7}, 8, 0, 2},
		{"huge chars clamp", def, math.MaxInt64, 0, maxEstimate},
		{"huge cjk clamp", def, math.MaxInt64, math.MaxInt64, maxEstimate},
		{"huge mixed clamp", def, math.MaxInt64, math.MaxInt64 - 1, maxEstimate},
		{"huge with chars per token 1", Estimator{CharsPerToken: 1}, 1 << 62, 0, maxEstimate},
		{"huge with chars per token 0.5", Estimator{CharsPerToken: 0.5}, 1 << 61, 0, maxEstimate},
		{"just below the clamp", def, 4 * (maxEstimate - 1), 0, maxEstimate - 1},
		{"at the clamp", def, 4 * maxEstimate, 0, maxEstimate},
		{"just above the clamp", def, 4*maxEstimate + 1, 0, maxEstimate},
	}
	for _, tc := range cases {
		if got := tc.e.Text(tc.chars, tc.cjk); got != tc.want {
			t.Errorf("%s: %+v.Text(%d, %d) = %d, want %d", tc.name, tc.e, tc.chars, tc.cjk, got, tc.want)
		}
	}
}

// TestEstimatorTextClampSmallCharsPerToken: with a small CharsPerToken (or
// NaN) and counts far beyond any real body, Text still clamps to
// maxEstimate rather than overflowing the int64 conversion.
func TestEstimatorTextClampSmallCharsPerToken(t *testing.T) {
	cases := []struct {
		e          Estimator
		chars, cjk int64
		want       int64
	}{
		{Estimator{CharsPerToken: 1}, math.MaxInt64, 0, maxEstimate},
		{Estimator{CharsPerToken: 0.5}, math.MaxInt64 / 2, 0, maxEstimate},
		{Estimator{CharsPerToken: 0.001}, 1 << 60, 0, maxEstimate},
		{Estimator{CharsPerToken: 0.5}, math.MaxInt64, math.MaxInt64 / 2, maxEstimate},
		{Estimator{CharsPerToken: math.NaN()}, 8, 0, 2},
	}
	for _, tc := range cases {
		if got := tc.e.Text(tc.chars, tc.cjk); got != tc.want {
			t.Errorf("%+v.Text(%d, %d) = %d, want %d", tc.e, tc.chars, tc.cjk, got, tc.want)
		}
	}
}

func TestEstimatorPromptUsesRequestCounts(t *testing.T) {
	cases := []struct {
		r    Request
		e    Estimator
		want int64
	}{
		{Request{}, Estimator{}, 0},
		{Request{PromptChars: 1}, Estimator{}, 1},
		{Request{PromptChars: 400}, Estimator{}, 100},
		{Request{PromptChars: 400, PromptCJK: 100}, Estimator{}, 100 + 75},
		{Request{PromptChars: 400}, Estimator{CharsPerToken: 2}, 200},
		// Nothing but the two counts matters.
		{Request{Endpoint: EndpointEmbedding, PromptChars: 8, MaxOutputTokens: 99, Choices: 9}, Estimator{}, 2},
		{Request{Endpoint: EndpointUnknown, PromptChars: 8}, Estimator{}, 2},
	}
	for _, tc := range cases {
		if got := tc.e.Prompt(&tc.r); got != tc.want {
			t.Errorf("%+v.Prompt(%+v) = %d, want %d", tc.e, tc.r, got, tc.want)
		}
	}
}

func TestEstimatorCompletion(t *testing.T) {
	generating := []Endpoint{EndpointChat, EndpointCompletion, EndpointResponses, EndpointMessages, EndpointGenerate, EndpointStreamGenerate}
	for _, ep := range generating {
		r := Request{Endpoint: ep, Choices: 1}
		if got := (Estimator{}).Completion(&r); got != DefaultCompletionTokens {
			t.Errorf("%v without a cap: %d, want DefaultCompletionTokens %d", ep, got, DefaultCompletionTokens)
		}
		if got := (Estimator{CompletionTokens: 300}).Completion(&r); got != 300 {
			t.Errorf("%v with CompletionTokens 300: %d, want 300", ep, got)
		}
		r.MaxOutputTokens = 42
		if got := (Estimator{CompletionTokens: 300}).Completion(&r); got != 42 {
			t.Errorf("%v with a cap of 42: %d, want 42", ep, got)
		}
	}
	for _, ep := range []Endpoint{EndpointEmbedding, EndpointUnknown} {
		r := Request{Endpoint: ep, MaxOutputTokens: 500, Choices: 4, PromptChars: 100}
		if got := (Estimator{CompletionTokens: 300}).Completion(&r); got != 0 {
			t.Errorf("%v: %d, want 0", ep, got)
		}
	}

	cases := []struct {
		name string
		e    Estimator
		r    Request
		want int64
	}{
		{"choices multiply the cap", Estimator{}, Request{Endpoint: EndpointChat, MaxOutputTokens: 100, Choices: 3}, 300},
		{"choices multiply the default", Estimator{}, Request{Endpoint: EndpointChat, Choices: 3}, 3 * DefaultCompletionTokens},
		{"choices multiply CompletionTokens", Estimator{CompletionTokens: 10}, Request{Endpoint: EndpointChat, Choices: 5}, 50},
		{"zero choices is one", Estimator{}, Request{Endpoint: EndpointChat, MaxOutputTokens: 7}, 7},
		{"negative choices is one", Estimator{}, Request{Endpoint: EndpointChat, MaxOutputTokens: 7, Choices: -3}, 7},
		{"negative cap is default", Estimator{}, Request{Endpoint: EndpointChat, MaxOutputTokens: -1, Choices: 1}, DefaultCompletionTokens},
		{"negative CompletionTokens is default", Estimator{CompletionTokens: -5}, Request{Endpoint: EndpointChat, Choices: 1}, DefaultCompletionTokens},
		{"CharsPerToken does not matter", Estimator{CharsPerToken: 1}, Request{Endpoint: EndpointChat, MaxOutputTokens: 9, Choices: 1, PromptChars: 100}, 9},
		{"unlisted endpoint value generates", Estimator{}, Request{Endpoint: Endpoint(200), MaxOutputTokens: 9, Choices: 1}, 9},
		{"huge cap clamps", Estimator{}, Request{Endpoint: EndpointChat, MaxOutputTokens: math.MaxInt64, Choices: 1}, maxEstimate},
		{"huge CompletionTokens clamps", Estimator{CompletionTokens: math.MaxInt64}, Request{Endpoint: EndpointChat, Choices: 1}, maxEstimate},
		{"huge choices clamp", Estimator{}, Request{Endpoint: EndpointChat, Choices: math.MaxInt64}, maxEstimate},
		{"product overflow clamps", Estimator{}, Request{Endpoint: EndpointChat, MaxOutputTokens: 1 << 32, Choices: 1 << 32}, maxEstimate},
		{"both huge clamp", Estimator{}, Request{Endpoint: EndpointChat, MaxOutputTokens: math.MaxInt64, Choices: math.MaxInt64}, maxEstimate},
		{"product exactly at the clamp", Estimator{}, Request{Endpoint: EndpointChat, MaxOutputTokens: 1 << 20, Choices: 1 << 20}, maxEstimate},
		{"product just below the clamp", Estimator{}, Request{Endpoint: EndpointChat, MaxOutputTokens: 1<<20 - 1, Choices: 1 << 20}, maxEstimate - 1<<20},
	}
	for _, tc := range cases {
		if got := tc.e.Completion(&tc.r); got != tc.want {
			t.Errorf("%s: %d, want %d", tc.name, got, tc.want)
		}
	}
}

// estParse routes path and parses body as the module does.
func estParse(t testing.TB, path, body string) Request {
	t.Helper()
	d, ep, m := Route("POST", path)
	if d == DialectUnknown {
		t.Fatalf("Route(%q) is unknown", path)
	}
	p := GetParser()
	defer PutParser(p)
	var req Request
	if err := p.Parse(d, ep, m, []byte(body), &req); err != nil {
		t.Fatalf("Parse(%s): %v", body, err)
	}
	return req
}

// TestEstimateFromBody checks the estimate end to end for the field each
// dialect names its output cap and choice count with.
func TestEstimateFromBody(t *testing.T) {
	const (
		chat      = "/v1/chat/completions"
		legacy    = "/v1/completions"
		responses = "/v1/responses"
		embed     = "/v1/embeddings"
		azure     = "/openai/deployments/gpt4o/chat/completions"
		anthropic = "/v1/messages"
		gemini    = "/v1beta/models/gemini-2.0-flash:generateContent"
		geminiSSE = "/v1beta/models/gemini-2.0-flash:streamGenerateContent"
		ollama    = "/api/chat"
		ollamaGen = "/api/generate"
		ollamaEmb = "/api/embed"
	)
	// msg8 is eight ASCII runes of prompt: two tokens by default.
	const msg8 = `"messages":[{"role":"user","content":"abcdefgh"}]`
	cases := []struct {
		name, path, body      string
		e                     Estimator
		wantPrompt, wantCompl int64
	}{
		{"openai default", chat, `{"model":"gpt-4o",` + msg8 + `}`, Estimator{}, 2, DefaultCompletionTokens},
		{"openai CompletionTokens", chat, `{"model":"gpt-4o",` + msg8 + `}`, Estimator{CompletionTokens: 256}, 2, 256},
		{"openai CharsPerToken", chat, `{"model":"gpt-4o",` + msg8 + `}`, Estimator{CharsPerToken: 2}, 4, DefaultCompletionTokens},
		{"openai max_tokens", chat, `{"max_tokens":100,` + msg8 + `}`, Estimator{}, 2, 100},
		{"openai max_completion_tokens", chat, `{"max_completion_tokens":50,` + msg8 + `}`, Estimator{}, 2, 50},
		{"openai max_completion_tokens wins", chat, `{"max_tokens":100,"max_completion_tokens":50,` + msg8 + `}`, Estimator{}, 2, 50},
		{"openai n", chat, `{"max_tokens":100,"n":3,` + msg8 + `}`, Estimator{}, 2, 300},
		{"openai n without cap", chat, `{"n":3,` + msg8 + `}`, Estimator{CompletionTokens: 10}, 2, 30},
		{"openai n 0", chat, `{"max_tokens":100,"n":0,` + msg8 + `}`, Estimator{}, 2, 100},
		{"openai max_tokens null", chat, `{"max_tokens":null,` + msg8 + `}`, Estimator{}, 2, DefaultCompletionTokens},
		{"openai huge cap clamps", chat, `{"max_tokens":9223372036854775807,"n":128,` + msg8 + `}`, Estimator{}, 2, maxEstimate},
		{"legacy best_of", legacy, `{"prompt":"abcd","max_tokens":10,"n":2,"best_of":5}`, Estimator{}, 1, 50},
		{"legacy token ids", legacy, `{"prompt":[1,2,3],"max_tokens":10}`, Estimator{}, 3, 10},
		{"responses max_output_tokens", responses, `{"input":"abcdefgh","max_output_tokens":77}`, Estimator{}, 2, 77},
		{"responses ignores max_tokens and n", responses, `{"input":"abcdefgh","max_tokens":77,"n":4}`, Estimator{}, 2, DefaultCompletionTokens},
		{"embeddings", embed, `{"input":"abcdefgh","max_tokens":77,"n":4}`, Estimator{}, 2, 0},
		{"embeddings no input", embed, `{"model":"text-embedding-3-small"}`, Estimator{}, 0, 0},
		{"azure max_tokens", azure, `{"max_tokens":9,` + msg8 + `}`, Estimator{}, 2, 9},
		{"anthropic max_tokens", anthropic, `{"model":"claude","max_tokens":200,"system":"abcd",` + msg8 + `}`, Estimator{}, 3, 200},
		{"gemini maxOutputTokens candidateCount", gemini, `{"contents":[{"parts":[{"text":"abcdefgh"}]}],"generationConfig":{"maxOutputTokens":64,"candidateCount":2}}`, Estimator{}, 2, 128},
		{"gemini string fields", gemini, `{"contents":[{"parts":[{"text":"abcdefgh"}]}],"generationConfig":{"maxOutputTokens":"64","candidateCount":"3"}}`, Estimator{}, 2, 192},
		{"gemini stream default", geminiSSE, `{"contents":[{"parts":[{"text":"abcdefgh"}]}]}`, Estimator{}, 2, DefaultCompletionTokens},
		{"ollama num_predict", ollama, `{"model":"llama3",` + msg8 + `,"options":{"num_predict":32}}`, Estimator{}, 2, 32},
		{"ollama num_predict -1", ollama, `{"model":"llama3",` + msg8 + `,"options":{"num_predict":-1}}`, Estimator{}, 2, DefaultCompletionTokens},
		{"ollama generate", ollamaGen, `{"model":"llama3","prompt":"abcdefgh","options":{"num_predict":5}}`, Estimator{}, 2, 5},
		{"ollama embed", ollamaEmb, `{"model":"llama3","input":["abcd","efgh"]}`, Estimator{}, 2, 0},
		{"no prompt text", chat, `{"messages":[]}`, Estimator{}, 0, DefaultCompletionTokens},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := estParse(t, tc.path, tc.body)
			if got := tc.e.Prompt(&r); got != tc.wantPrompt {
				t.Errorf("Prompt = %d, want %d (request %+v)", got, tc.wantPrompt, r)
			}
			if got := tc.e.Completion(&r); got != tc.wantCompl {
				t.Errorf("Completion = %d, want %d (request %+v)", got, tc.wantCompl, r)
			}
		})
	}
}

// TestEstimateCJKRule pins which runes count one token each: Han
// (including extensions and compatibility ideographs), Hiragana, Katakana
// and Hangul. Everything else, CJK punctuation, half-width forms,
// Cyrillic and emoji included, counts CharsPerToken runes per token.
func TestEstimateCJKRule(t *testing.T) {
	cases := []struct {
		text       string
		chars, cjk int64
		want       int64
	}{
		{"你好世界", 4, 4, 4},
		{"こんにちは", 5, 5, 5},
		{"カタカナ", 4, 4, 4},
		{"안녕하세요", 5, 5, 5},
		{"\u1100\u11ff", 2, 2, 2},         // Hangul Jamo
		{"\u3400\u4dbf", 2, 2, 2},         // Extension A
		{"\U00020000\U0002a6df", 2, 2, 2}, // Extension B
		{"\uf900\ufaff", 2, 2, 2},         // Compatibility Ideographs
		{"\U0002f800\U0002fa1f", 2, 2, 2}, // Compatibility Supplement
		{"hello, 世界!", 10, 2, 2 + 2},
		{"。、「」", 4, 0, 1},        // CJK punctuation (U+3000 block)
		{"ｱｲｳｴｵ", 5, 0, 2},       // half-width Katakana
		{"ＡＢＣＤ", 4, 0, 1},        // full-width Latin
		{"Привет мир", 10, 0, 3}, // Cyrillic
		{"Γειά σου", 8, 0, 2},    // Greek
		{"😀😀😀😀😀", 5, 0, 2},       // emoji
		{"\u10ff\u1200\u303f\u3100\u33ff\u4dc0\uabff\ud7b0\uf8ff\ufb00\U0001ffff\U0002fa20", 12, 0, 3}, // just outside every range
	}
	for _, tc := range cases {
		body, err := json.Marshal(map[string]any{"messages": []map[string]string{{"role": "user", "content": tc.text}}})
		if err != nil {
			t.Fatal(err)
		}
		r := estParse(t, "/v1/chat/completions", string(body))
		if r.PromptChars != tc.chars || r.PromptCJK != tc.cjk {
			t.Errorf("%q: PromptChars, PromptCJK = %d, %d, want %d, %d", tc.text, r.PromptChars, r.PromptCJK, tc.chars, tc.cjk)
		}
		if got := (Estimator{}).Prompt(&r); got != tc.want {
			t.Errorf("%q: Prompt = %d, want %d", tc.text, got, tc.want)
		}
	}
}

func TestEstimateNoAlloc(t *testing.T) {
	r := estParse(t, "/v1/chat/completions", string(estChatBody4K))
	var sink int64
	allocs := testing.AllocsPerRun(100, func() {
		sink += (Estimator{}).Prompt(&r) + (Estimator{}).Completion(&r)
	})
	if allocs != 0 {
		t.Errorf("Prompt+Completion: %v allocs, want 0", allocs)
	}
	_ = sink
}

// estSample is one text of the accuracy corpus in testdata/estimate.
type estSample struct {
	file string
	// oursCloser lists the encodings on which Estimator must be closer to
	// the real count than bytes/4 (log scale). Only the samples in scripts
	// whose UTF-8 takes 2-4 bytes per rune, where the two differ, have any.
	oursCloser []string
}

const (
	encO200k  = "o200k_base"
	encCl100k = "cl100k_base"
)

// estCorpus is the accuracy corpus. bytes/4 is not closer everywhere: on
// o200k_base, Chinese and Japanese run near 0.8 tokens per rune, i.e. about
// 4 UTF-8 bytes per token, so bytes/4 lands within 6% while one token per
// CJK rune overestimates by 16-19%; on cl100k_base, Russian runs at about 2
// runes per token, so bytes/4 (2 bytes per Cyrillic rune) is within 7%
// while 4 runes per token underestimates by half. TestEstimateAccuracy
// prints which is closer for every sample.
var estCorpus = []estSample{
	{"english.txt", nil},
	{"go_source.txt", nil},
	{"data.json", nil},
	{"chat_transcript.txt", nil},
	{"chinese.txt", []string{encCl100k}},
	{"japanese.txt", []string{encCl100k}},
	{"russian.txt", []string{encO200k}},
	{"emoji_markdown.md", nil},
}

// estBounds are the bounds of Estimator's ratio to the real token count,
// for every sample. Measured with the default Estimator: 0.60× (data.json)
// to 1.21× (english.txt) on o200k_base, 0.52× (russian.txt) to 1.20× on
// cl100k_base. The bounds leave 13-25% of margin for corpus edits.
var estBounds = map[string][2]float64{
	encO200k:  {0.50, 1.5},
	encCl100k: {0.45, 1.5},
}

// TestEstimateAccuracy compares the default Estimator, and the bytes/4 rule
// it replaced, with the real token counts of OpenAI's o200k_base (GPT-4o,
// GPT-4.1, o-series) and cl100k_base (GPT-4, GPT-3.5) tokenisers. Run with
// -v to see the table.
func TestEstimateAccuracy(t *testing.T) {
	o200k, err := tokenizer.Get(tokenizer.O200kBase)
	if err != nil {
		t.Fatal(err)
	}
	cl100k, err := tokenizer.Get(tokenizer.Cl100kBase)
	if err != nil {
		t.Fatal(err)
	}
	// Summary per estimator and encoding: min and max ratio, sum of
	// |ln ratio| for the mean error on a log scale.
	type summary struct{ lo, hi, logErr float64 }
	sums := map[string]*summary{}
	note := func(key string, r float64) {
		s := sums[key]
		if s == nil {
			s = &summary{lo: r, hi: r}
			sums[key] = s
		}
		s.lo, s.hi = min(s.lo, r), max(s.hi, r)
		s.logErr += math.Abs(math.Log(r))
	}
	var table strings.Builder
	table.WriteString("\nratio = estimate / real; bytes = UTF-8 bytes of the text; closer = nearer to real on a log scale (o200k / cl100k)\n\n")
	table.WriteString("| sample | bytes | runes | o200k | cl100k | bytes/4 | ×o200k | ×cl100k | ours | ×o200k | ×cl100k | closer |\n")
	table.WriteString("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|\n")
	for _, s := range estCorpus {
		raw, err := os.ReadFile(filepath.Join("testdata", "estimate", s.file))
		if err != nil {
			t.Fatal(err)
		}
		text := string(raw)
		if !utf8.ValidString(text) {
			t.Fatalf("%s is not valid UTF-8", s.file)
		}
		if n := len(raw); n < 1024 || n > 6*1024 {
			t.Errorf("%s: %d bytes, want 1-6 KB", s.file, n)
		}
		body, err := json.Marshal(map[string]any{
			"model":    "gpt-4o",
			"messages": []map[string]string{{"role": "user", "content": text}},
		})
		if err != nil {
			t.Fatal(err)
		}
		r := estParse(t, "/v1/chat/completions", string(body))
		if want := int64(utf8.RuneCountInString(text)); r.PromptChars != want {
			t.Errorf("%s: PromptChars %d, want the %d runes of the text", s.file, r.PromptChars, want)
		}
		ours := Estimator{}.Prompt(&r)
		byBytes := (int64(len(raw)) + 3) / 4
		realO, err := o200k.Count(text)
		if err != nil {
			t.Fatal(err)
		}
		realC, err := cl100k.Count(text)
		if err != nil {
			t.Fatal(err)
		}
		ratio := func(est int64, real int) float64 { return float64(est) / float64(real) }

		var closer []string
		for _, enc := range []struct {
			name string
			real int
		}{{encO200k, realO}, {encCl100k, realC}} {
			got, gotBytes := ratio(ours, enc.real), ratio(byBytes, enc.real)
			note("ours "+enc.name, got)
			note("bytes/4 "+enc.name, gotBytes)
			if b := estBounds[enc.name]; got < b[0] || got > b[1] {
				t.Errorf("%s, %s: estimate %d for %d real tokens (%.2f×), want within [%.2f×, %.2f×]",
					s.file, enc.name, ours, enc.real, got, b[0], b[1])
			}
			// Distance on a log scale, so 2× over and 2× under are as bad.
			ourErr, bytesErr := math.Abs(math.Log(got)), math.Abs(math.Log(gotBytes))
			switch {
			case ours == byBytes:
				closer = append(closer, "same")
			case ourErr < bytesErr:
				closer = append(closer, "ours")
			default:
				closer = append(closer, "bytes/4")
			}
			if slices.Contains(s.oursCloser, enc.name) && bytesErr <= ourErr {
				t.Errorf("%s, %s: bytes/4 (%d, %.2f×) is not worse than the estimate (%d, %.2f×) for %d real tokens",
					s.file, enc.name, byBytes, gotBytes, ours, got, enc.real)
			}
		}
		fmt.Fprintf(&table, "| %s | %d | %d | %d | %d | %d | %.2f | %.2f | %d | %.2f | %.2f | %s |\n",
			s.file, len(raw), r.PromptChars, realO, realC,
			byBytes, ratio(byBytes, realO), ratio(byBytes, realC),
			ours, ratio(ours, realO), ratio(ours, realC), strings.Join(closer, " / "))
	}
	table.WriteString("\n| estimator | encoding | min ratio | max ratio | mean \\|ln ratio\\| |\n|---|---|--:|--:|--:|\n")
	for _, est := range []string{"bytes/4", "ours"} {
		for _, enc := range []string{encO200k, encCl100k} {
			s := sums[est+" "+enc]
			fmt.Fprintf(&table, "| %s | %s | %.2f | %.2f | %.2f |\n", est, enc, s.lo, s.hi, s.logErr/float64(len(estCorpus)))
		}
	}
	t.Log(table.String())
}

// estChatBody4K is a realistic OpenAI chat request of about 4 KB: a system
// prompt, tool definitions, a multi-turn conversation with code, a tool
// call and its result.
var estChatBody4K = func() []byte {
	type fn struct {
		Name        string          `json:"name"`
		Description string          `json:"description,omitempty"`
		Parameters  json.RawMessage `json:"parameters,omitempty"`
		Arguments   string          `json:"arguments,omitempty"`
	}
	type tool struct {
		ID       string `json:"id,omitempty"`
		Type     string `json:"type"`
		Function fn     `json:"function"`
	}
	type msg struct {
		Role       string `json:"role"`
		Content    any    `json:"content"`
		ToolCalls  []tool `json:"tool_calls,omitempty"`
		ToolCallID string `json:"tool_call_id,omitempty"`
	}
	body := struct {
		Model         string         `json:"model"`
		Messages      []msg          `json:"messages"`
		Tools         []tool         `json:"tools"`
		Temperature   float64        `json:"temperature"`
		MaxTokens     int            `json:"max_completion_tokens"`
		Stream        bool           `json:"stream"`
		StreamOptions map[string]any `json:"stream_options"`
	}{
		Model:         "gpt-4o-2024-08-06",
		Temperature:   0.2,
		MaxTokens:     1024,
		Stream:        true,
		StreamOptions: map[string]any{"include_usage": true},
		Tools: []tool{{Type: "function", Function: fn{
			Name:        "run_tests",
			Description: "Run the Go tests of a package and return the output.",
			Parameters:  json.RawMessage(`{"type":"object","properties":{"package":{"type":"string","description":"Import path, e.g. ./queue"},"run":{"type":"string","description":"Regexp of test names"}},"required":["package"]}`),
		}}},
		Messages: []msg{
			{Role: "system", Content: "You are a senior Go engineer helping a colleague review code. Answer precisely and briefly. When you suggest a change, show the smallest diff that fixes the problem and explain why it is needed. Prefer the standard library. If you are not sure about behaviour, run the tests with the run_tests tool rather than guessing."},
			{Role: "user", Content: []map[string]string{{"type": "text", "text": "Our bounded queue sometimes deadlocks in production when the context is cancelled while a producer waits. Here is Push:\n\n```go\nfunc (q *Queue) Push(ctx context.Context, it Item) error {\n\tq.mu.Lock()\n\tdefer q.mu.Unlock()\n\tfor q.size == len(q.items) && !q.closed {\n\t\tif err := ctx.Err(); err != nil {\n\t\t\treturn err\n\t\t}\n\t\tq.notFull.Wait()\n\t}\n\tif q.closed {\n\t\treturn ErrClosed\n\t}\n\ttail := (q.head + q.size) % len(q.items)\n\tq.items[tail] = it\n\tq.size++\n\tq.notEmpty.Signal()\n\treturn nil\n}\n```\n\nWhat is wrong?"}}},
			{Role: "assistant", Content: "The loop checks ctx.Err() only before it waits. sync.Cond.Wait does not return when the context is cancelled, so a producer that is already waiting stays blocked until some consumer pops an item and signals notFull. If no consumer ever comes, the goroutine leaks, and anything waiting for it looks like a deadlock.\n\nThe usual fix is to wake waiters when the context ends: start context.AfterFunc(ctx, func() { q.mu.Lock(); q.notFull.Broadcast(); q.mu.Unlock() }) before the loop and call the returned stop function when Push returns. The waiter then re-checks ctx.Err() and leaves."},
			{Role: "user", Content: "Let's try the AfterFunc version. Can you check that the existing tests still pass with it?"},
			{Role: "assistant", Content: nil, ToolCalls: []tool{{ID: "call_8KxR2", Type: "function", Function: fn{Name: "run_tests", Arguments: `{"package":"./queue","run":"TestPush|TestPop|TestClose"}`}}}},
			{Role: "tool", ToolCallID: "call_8KxR2", Content: "=== RUN   TestPush\n--- PASS: TestPush (0.00s)\n=== RUN   TestPushCancelled\n--- PASS: TestPushCancelled (0.01s)\n=== RUN   TestPop\n--- PASS: TestPop (0.00s)\n=== RUN   TestPopExpired\n--- PASS: TestPopExpired (0.00s)\n=== RUN   TestClose\n--- PASS: TestClose (0.00s)\nPASS\nok  \texample.com/queue\t0.214s"},
			{Role: "assistant", Content: "All five tests pass, including TestPushCancelled, which exercises the cancelled producer. I would add one more test in which the queue is full, no consumer runs, and the context is cancelled after the producer has started waiting; it should return context.Canceled within a few milliseconds instead of hanging."},
			{Role: "user", Content: "Good idea. Write that test, and keep it fast enough for -race on CI: no sleeps longer than 10ms, please. Also, should Pop get the same treatment?"},
			{Role: "assistant", Content: "Here is the test. It fills the queue, starts a producer that blocks, cancels its context once the producer is waiting, and fails if Push has not returned within a second:\n\n```go\nfunc TestPushCancelWhileWaiting(t *testing.T) {\n\tq := New(1)\n\tif err := q.Push(context.Background(), Item{ID: \"a\"}); err != nil {\n\t\tt.Fatal(err)\n\t}\n\tctx, cancel := context.WithCancel(context.Background())\n\tdone := make(chan error, 1)\n\tgo func() { done <- q.Push(ctx, Item{ID: \"b\"}) }()\n\ttime.Sleep(5 * time.Millisecond)\n\tcancel()\n\tselect {\n\tcase err := <-done:\n\t\tif !errors.Is(err, context.Canceled) {\n\t\t\tt.Fatalf(\"Push: %v, want context.Canceled\", err)\n\t\t}\n\tcase <-time.After(time.Second):\n\t\tt.Fatal(\"Push did not return after cancel\")\n\t}\n}\n```\n\nPop takes no context today, so it cannot be cancelled at all; a consumer only leaves when Close is called. Give it one and the same AfterFunc fix."},
		},
	}
	b, err := json.Marshal(body)
	if err != nil {
		panic(err)
	}
	return b
}()

// BenchmarkEstimate4KB measures what the module spends estimating one ~4 KB
// chat request: Parse plus the estimate, and the estimate alone.
func BenchmarkEstimate4KB(b *testing.B) {
	body := estChatBody4K
	d, ep, m := Route("POST", "/v1/chat/completions")
	var e Estimator
	var sink int64
	b.Run("parse+estimate", func(b *testing.B) {
		var req Request
		b.SetBytes(int64(len(body)))
		b.ReportAllocs()
		for b.Loop() {
			p := GetParser()
			if err := p.Parse(d, ep, m, body, &req); err != nil {
				b.Fatal(err)
			}
			PutParser(p)
			sink += e.Prompt(&req) + e.Completion(&req)
		}
		b.ReportMetric(float64(len(body)), "body_bytes")
	})
	b.Run("estimate", func(b *testing.B) {
		req := estParse(b, "/v1/chat/completions", string(body))
		b.ReportAllocs()
		for b.Loop() {
			sink += e.Prompt(&req) + e.Completion(&req)
		}
	})
	_ = sink
}
