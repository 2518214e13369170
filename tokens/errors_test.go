package tokens

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
)

func TestWriteError(t *testing.T) {
	const msg = "slow down \"now\" \n <b>&\u2028 \xff"
	const wantMsg = "slow down \"now\" \n <b>&\u2028 \uFFFD"
	type openAIBody struct {
		Error struct {
			Message string  `json:"message"`
			Type    string  `json:"type"`
			Param   *string `json:"param"`
			Code    string  `json:"code"`
		} `json:"error"`
	}
	for _, tt := range []struct {
		d                Dialect
		status           int
		kind             ErrorKind
		unit             string
		wantType, wantCd string
	}{
		{DialectOpenAI, 429, ErrRateLimited, "tokens", "tokens", "rate_limit_exceeded"},
		{DialectOpenAI, 429, ErrRateLimited, "", "requests", "rate_limit_exceeded"},
		{DialectAzure, 429, ErrRateLimited, "requests", "requests", "rate_limit_exceeded"},
		{DialectUnknown, 413, ErrTooLarge, "tokens", "invalid_request_error", "request_too_large"},
		{DialectOpenAI, 400, ErrBadRequest, "", "invalid_request_error", "invalid_request"},
	} {
		rec := httptest.NewRecorder()
		rec.Header().Set("Retry-After", "7")
		WriteError(rec, tt.d, tt.status, tt.kind, tt.unit, msg)
		checkCommon(t, rec, tt.status)
		var b openAIBody
		decode(t, rec, &b)
		if b.Error.Message != wantMsg || b.Error.Type != tt.wantType || b.Error.Code != tt.wantCd || b.Error.Param != nil {
			t.Errorf("%v %d: got %+v", tt.d, tt.status, b)
		}
		if !hasKey(t, rec, "param") {
			t.Errorf("%v: param missing", tt.d)
		}
	}

	for _, tt := range []struct {
		status   int
		kind     ErrorKind
		wantType string
	}{
		{429, ErrRateLimited, "rate_limit_error"},
		{413, ErrTooLarge, "request_too_large"},
		{400, ErrBadRequest, "invalid_request_error"},
	} {
		rec := httptest.NewRecorder()
		WriteError(rec, DialectAnthropic, tt.status, tt.kind, "tokens", msg)
		checkCommon(t, rec, tt.status)
		var b struct {
			Type  string `json:"type"`
			Error struct {
				Type    string `json:"type"`
				Message string `json:"message"`
			} `json:"error"`
		}
		decode(t, rec, &b)
		if b.Type != "error" || b.Error.Type != tt.wantType || b.Error.Message != wantMsg {
			t.Errorf("anthropic %d: got %+v", tt.status, b)
		}
	}

	for _, tt := range []struct {
		status     int
		kind       ErrorKind
		wantStatus string
	}{
		{429, ErrRateLimited, "RESOURCE_EXHAUSTED"},
		{413, ErrTooLarge, "INVALID_ARGUMENT"},
		{400, ErrBadRequest, "INVALID_ARGUMENT"},
	} {
		rec := httptest.NewRecorder()
		WriteError(rec, DialectGemini, tt.status, tt.kind, "", msg)
		checkCommon(t, rec, tt.status)
		var b struct {
			Error struct {
				Code    int    `json:"code"`
				Message string `json:"message"`
				Status  string `json:"status"`
			} `json:"error"`
		}
		decode(t, rec, &b)
		if b.Error.Code != tt.status || b.Error.Status != tt.wantStatus || b.Error.Message != wantMsg {
			t.Errorf("gemini %d: got %+v", tt.status, b)
		}
	}

	rec := httptest.NewRecorder()
	WriteError(rec, DialectOllama, 429, ErrRateLimited, "tokens", msg)
	checkCommon(t, rec, 429)
	var b struct {
		Error string `json:"error"`
	}
	decode(t, rec, &b)
	if b.Error != wantMsg {
		t.Errorf("ollama: got %+v", b)
	}
}

func checkCommon(t *testing.T, rec *httptest.ResponseRecorder, status int) {
	t.Helper()
	if rec.Code != status {
		t.Errorf("status = %d, want %d", rec.Code, status)
	}
	if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q", ct)
	}
	if ra := rec.Header().Get("Retry-After"); ra != "" && ra != "7" {
		t.Errorf("Retry-After changed to %q", ra)
	}
}

func decode(t *testing.T, rec *httptest.ResponseRecorder, v any) {
	t.Helper()
	if !json.Valid(rec.Body.Bytes()) {
		t.Fatalf("invalid JSON body %q", rec.Body.String())
	}
	if err := json.Unmarshal(rec.Body.Bytes(), v); err != nil {
		t.Fatalf("decode %q: %v", rec.Body.String(), err)
	}
}

func hasKey(t *testing.T, rec *httptest.ResponseRecorder, key string) bool {
	var m map[string]map[string]any
	decode(t, rec, &m)
	_, ok := m["error"][key]
	return ok
}

func TestAppendJSONString(t *testing.T) {
	for _, s := range []string{"", "plain", "\x00\x1f\x7f", `"\`, "tab\tnl\ncr\r", "é中😀", "\xff\xc3", "\u2028\u2029", "a\xe2\x80"} {
		got := appendJSONString(nil, s)
		var back string
		if err := json.Unmarshal(got, &back); err != nil {
			t.Fatalf("appendJSONString(%q) = %s: %v", s, got, err)
		}
		want, _ := json.Marshal(s)
		var wantBack string
		_ = json.Unmarshal(want, &wantBack)
		if back != wantBack {
			t.Errorf("appendJSONString(%q) round-trips to %q, encoding/json to %q", s, back, wantBack)
		}
	}
}

func BenchmarkWriteError(b *testing.B) {
	w := discardWriter{h: http.Header{}}
	b.ReportAllocs()
	for b.Loop() {
		WriteError(w, DialectOpenAI, 429, ErrRateLimited, "tokens", "Rate limit reached for requests")
	}
}

type discardWriter struct{ h http.Header }

func (w discardWriter) Header() http.Header         { return w.h }
func (w discardWriter) Write(b []byte) (int, error) { return len(b), nil }
func (w discardWriter) WriteHeader(int)             {}
