package spop

// The tests that need spoptest's encoder live in package spop_test (spoptest
// imports spop). These hooks give them the internals they check.

// NegotiateHello is negotiateHello.
var NegotiateHello = negotiateHello

// SetBudget makes g share b, as Listener.Accept does.
func (g *Guard) SetBudget(b *Budget) { g.budget = b }
