package tokens

import "math"

// Estimator turns what Parse counted into a token estimate, before the
// upstream has said anything. It is deliberately simple: the estimate is
// corrected by the real usage when the response ends, so it only needs to be
// close enough that a request is not admitted far beyond a limit. Its error
// is reported per settlement, so operators can see how close it is and tune
// CharsPerToken per model.
type Estimator struct {
	// CharsPerToken is how many characters of non-CJK text make one token.
	// BPE tokenizers of the GPT-4 and Claude families average about 4 for
	// English prose and code; Cyrillic, Greek and similar scripts run closer
	// to 2. Zero means DefaultCharsPerToken.
	CharsPerToken float64
	// CompletionTokens is the completion estimate when the request names no
	// maximum. Zero means DefaultCompletionTokens.
	CompletionTokens int64
}

// Defaults of Estimator.
const (
	DefaultCharsPerToken    = 4.0
	DefaultCompletionTokens = 1024
)

// maxEstimate bounds every estimate, so that a hostile max_tokens cannot
// overflow the arithmetic downstream. It is far beyond any model's context.
const maxEstimate = 1 << 40

// Prompt estimates the prompt tokens of a request: CJK runes (Han, Kana,
// Hangul) at one token each, since BPE vocabularies hold few multi-character
// CJK tokens, and the rest at CharsPerToken characters per token, rounded
// up. A request with any text costs at least one token.
func (e Estimator) Prompt(r *Request) int64 {
	return e.Text(r.PromptChars, r.PromptCJK)
}

// Text estimates the tokens of chars runes of which cjk are CJK.
func (e Estimator) Text(chars, cjk int64) int64 {
	if chars <= 0 {
		return 0
	}
	cjk = min(max(cjk, 0), chars)
	cpt := e.CharsPerToken
	if !(cpt > 0) { // also NaN
		cpt = DefaultCharsPerToken
	}
	// Compare in floating point before converting: a huge count over a
	// small ratio must clamp, not overflow.
	other := math.Ceil(float64(chars-cjk) / cpt)
	if other >= maxEstimate {
		return maxEstimate
	}
	return min(max(cjk+int64(other), 1), maxEstimate)
}

// Completion estimates the completion tokens of a request: its maximum
// output times the number of choices, or CompletionTokens when it names no
// maximum. Embeddings generate nothing, and nothing is known of an
// unrecognised request.
func (e Estimator) Completion(r *Request) int64 {
	if r.Endpoint == EndpointEmbedding || r.Endpoint == EndpointUnknown {
		return 0
	}
	per := r.MaxOutputTokens
	if per <= 0 {
		per = e.CompletionTokens
		if per <= 0 {
			per = DefaultCompletionTokens
		}
	}
	choices := max(r.Choices, 1)
	if per > maxEstimate/choices {
		return maxEstimate
	}
	return per * choices
}
